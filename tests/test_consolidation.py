"""Stage 4 and the probes end to end, through transformers' Trainer, on a tiny model."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from consolidation.freezing.freezer import as_bits
from consolidation.stages import consolidate
from consolidation.workdir import work_dir_for
from cpi_merge.analysis.plan import CorePlan
from cpi_merge.errors import CpiError, DataError, OutputError, ResumeError

from helpers.consolidation_world import consolidation_config, write_jsonl
from helpers.network import free_port


def union_of_cores(plan, tasks):
    """Brute force: positions with |θi − θ0| >= t_i for any of tasks, per tensor."""
    base = {}
    for f in sorted(os.listdir(plan.base_model)):
        if f.endswith(".safetensors"):
            base.update(load_file(os.path.join(plan.base_model, f)))
    masks = {}
    for t in plan.tasks:
        if t.name not in tasks:
            continue
        task = {}
        for f in sorted(os.listdir(t.model)):
            if f.endswith(".safetensors"):
                task.update(load_file(os.path.join(t.model, f)))
        for name in base:
            m = (task[name].float() - base[name].float()).abs() >= t.core_threshold
            masks[name] = masks.get(name, torch.zeros_like(m)) | m
    return masks


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_probes_write_models_and_a_recipe(world):
    probes = world["probes"]
    report = json.loads((probes / "probes_report.json").read_text())
    assert set(report) == {"rev", "sort", "dup"}
    for task, r in report.items():
        assert r["steps"] == 3 and r["relative_update_norm"] > 0
        assert (probes / task / "model.safetensors").exists()
        assert (probes / task / "tokenizer_config.json").exists()
    recipe = (probes / "probes_recipe.yml").read_text()
    assert recipe.startswith("# cpi recipe") and "cpi-merge" in recipe


def test_consolidation_freezes_earlier_cores_exactly(world, tmp_path):
    cfg = consolidation_config(tmp_path, world, training={"save_steps": 1})
    out = tmp_path / "out"
    records = consolidate(cfg, out, progress=False)
    plan = CorePlan.load(world["merged"])
    assert [r.tasks for r in records] == plan.groups
    assert len(records) >= 2, "the fixture must give several stages"
    report = json.loads((out / "consolidation_report.json").read_text())
    assert [s["index"] for s in report["stages"]] == list(range(1, len(records) + 1))
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "loss_curve.png"):
        assert (out / name).exists(), name
    previous = weights(world["merged"])
    for k, record in enumerate(records, 1):
        earlier = [t for g in plan.groups[: k - 1] for t in g]
        masks = union_of_cores(plan, earlier)
        assert record.frozen_entries == sum(int(m.sum()) for m in masks.values())
        assert record.steps == 3 and record.first_loss is not None
        now = weights(out / "stages" / str(k))
        for name, m in masks.items():
            assert torch.equal(as_bits(now[name][m]), as_bits(previous[name][m])), (k, name)
        changed = sum(int((now[n] != previous[n]).sum()) for n in now)
        assert changed > 0.5 * sum(v.numel() for v in now.values()) - record.frozen_entries
        previous = now
    assert all(torch.equal(weights(out)[n], previous[n]) for n in previous)
    assert not work_dir_for(out).exists()


def test_full_sft_baseline_is_one_config_away(world, tmp_path):
    cfg = consolidation_config(tmp_path, world, stages="single", freeze="none", save_stages=False)
    records = consolidate(cfg, tmp_path / "sft", progress=False)
    assert len(records) == 1 and records[0].frozen_entries == 0
    assert len(records[0].tasks) == 3
    assert not (tmp_path / "sft" / "stages").exists()


def test_interrupted_run_resumes_to_the_same_weights(world, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import consolidation.stages as stages

    cfg = consolidation_config(tmp_path, world, training={"save_steps": 1})
    straight = tmp_path / "straight"
    consolidate(cfg, straight, progress=False)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if "stage-2" in args.output_dir and state.global_step == 2:
                raise KeyboardInterrupt("simulated crash")

    real = stages.run_stage
    monkeypatch.setattr(stages, "run_stage", lambda *a, **k: real(*a, callbacks=[Crash()], **k))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        consolidate(cfg, out, progress=False)
    assert not out.exists()
    work = work_dir_for(out)
    assert (work / "stage-1" / "done" / "record.json").exists()
    # an interrupted save: a newer checkpoint without the completion marker is ignored
    shutil.copytree(work / "stage-2" / "checkpoint-1", work / "stage-2" / "checkpoint-9")
    (work / "stage-2" / "checkpoint-9" / ".cpi-complete").unlink()
    with pytest.raises(OutputError, match="--resume"):
        consolidate(cfg, out, progress=False)
    monkeypatch.setattr(stages, "run_stage", real)
    consolidate(cfg, out, progress=False, resume=True)
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_marked_checkpoint_missing_rng_state_is_refused(tmp_path):
    from consolidation.training.checkpoints import latest_complete_checkpoint

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for f in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors"):
        (folder / f).write_text("x")
    (folder / ".cpi-complete").write_text(json.dumps({"world_size": 1}))
    with pytest.raises(ResumeError, match="rng_state.pth"):
        latest_complete_checkpoint(tmp_path)


def test_bad_inputs_fail_before_training(world, tmp_path, monkeypatch):
    import consolidation.stages as stages

    monkeypatch.setattr(stages, "run_stage", lambda *a, **k: pytest.fail("training started"))
    good = yaml.safe_load(consolidation_config(tmp_path, world).read_text())

    def run(**changes):
        doc = {**good, **changes}
        path = tmp_path / "bad.yml"
        path.write_text(yaml.safe_dump(doc))
        return consolidate(path, tmp_path / "never", progress=False)

    keys = list(good["data"])
    with pytest.raises(DataError, match="does not exist"):
        run(data={**good["data"], keys[0]: str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        run(data={**good["data"], keys[0]: str(bad)})
    with pytest.raises(DataError, match="not in the plan"):
        run(data={**good["data"], "someone-else": str(bad)})
    with pytest.raises(DataError, match="have no data"):
        run(data={k: v for k, v in good["data"].items() if k != keys[1]})
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="fewer than samples_per_task"):
        run(data={**good["data"], keys[0]: str(small)})
    with pytest.raises(CpiError, match="unknown key"):
        run(learning_rate=0.1)
    with pytest.raises(CpiError, match="cannot read plan"):
        run(plan=str(tmp_path / "nope.json"))
    assert not (tmp_path / "never").exists()


def test_plan_for_another_model_is_refused(world, tmp_path):
    from benchmarks.tiny_models import char_tokenizer, tiny_llama

    other = tmp_path / "other"
    tiny_llama(len(char_tokenizer()), hidden=16, layers=2, heads=2).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    cfg = consolidation_config(
        tmp_path, world, model=str(other), plan=str(world["merged"] / "cpi_plan.json")
    )
    with pytest.raises(CpiError, match="the plan does not describe this model"):
        consolidate(cfg, tmp_path / "never", progress=False)


def launcher_command(launcher: str) -> list[str]:
    """The launcher's arguments, on a port that is free now."""
    port = str(free_port())
    if launcher == "torchrun":
        return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    # accelerate's multi-process launcher; `--cpu` alone would start a single process
    return [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
    ]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_with_gloo(world, tmp_path, launcher):
    """2 CPU processes: same masks and weights on every rank, exact freezing."""
    import subprocess
    import sys

    cfg = consolidation_config(tmp_path, world, samples_per_task=8)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *launcher_command(launcher), "-m", "consolidation.cli"]
    run = subprocess.run(
        [*command, str(cfg), str(out), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "consolidation_report.json").read_text())
    assert report["world_size"] == 2
    assert all(s["ranks_agree"] is True for s in report["stages"])
    plan = CorePlan.load(world["merged"])
    previous = weights(world["merged"])
    for k, stage in enumerate(report["stages"], 1):
        masks = union_of_cores(plan, [t for g in plan.groups[: k - 1] for t in g])
        assert stage["frozen_entries"] == sum(int(m.sum()) for m in masks.values())
        now = weights(out / "stages" / str(k))
        for name, m in masks.items():
            assert torch.equal(as_bits(now[name][m]), as_bits(previous[name][m]))
        previous = now


def test_cli_routes_run_and_probe(world, tmp_path):
    from click.testing import CliRunner

    from consolidation.cli import main

    cfg = consolidation_config(tmp_path, world, stages="single", save_stages=False)
    result = CliRunner().invoke(main, [str(cfg), str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "stage 1:" in result.output and (tmp_path / "o" / "model.safetensors").exists()
    again = CliRunner().invoke(main, [str(cfg), str(tmp_path / "o")])
    assert again.exit_code == 2 and "--force" in again.output
    bad = tmp_path / "probe.yml"
    bad.write_text(yaml.safe_dump({"model": str(world["base"]), "data": {"../x": "a.jsonl"}}))
    result = CliRunner().invoke(main, ["probe", str(bad), str(tmp_path / "p")])
    assert result.exit_code == 2 and "plain folder names" in result.output


def test_plan_check_skips_stored_buffers(world):
    from consolidation.freezing.masks import check_plan_matches_model

    plan = CorePlan.load(world["merged"])
    shapes = {t.name: tuple(t.shape) for t in plan.tensors}
    buffer = plan.tensors[0].name
    del shapes[buffer]
    check_plan_matches_model(plan, shapes, {buffer})  # a stored float buffer: not trained
    with pytest.raises(CpiError, match=f"{buffer}.*not a parameter"):
        check_plan_matches_model(plan, shapes)
