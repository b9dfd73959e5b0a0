"""Consolidation with the model sharded over 2 CPU processes (FSDP2, gloo), end to end.

The model is sharded as transformers loads it; exact freezing then works on each
process's shard. Every check compares with the same run's inputs or a plain run:
frozen entries bit-identical at every stage end, the rest trained, the result equal to a
single process within a stated tolerance, resume bit for bit, accelerate's FSDP2 config
with bf16 mixed precision and tied embeddings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from consolidation.freezing.freezer import as_bits
from consolidation.stages import consolidate
from cpi_merge.analysis.plan import CorePlan

from helpers.consolidation_world import consolidation_config
from helpers.network import free_port
from helpers.references import brute_force

FSDP_KEYS = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}
TOLERANCE = 1e-4
"""FSDP vs one process, same global batch: max |difference| of any weight, and the
difference's norm relative to the update's. Measured: 4.4e-6 and 1.7e-6 (reduction order)."""


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def torchrun() -> list[str]:
    port = str(free_port())
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]


def launch(launcher: list[str], cfg: Path, out: Path, *extra: str, env=None, wait=True):
    """Run ``consolidation.cli`` under a 2-process launcher (its own process group)."""
    cmd = [sys.executable, *launcher, "-m", "consolidation.cli", str(cfg), str(out), "-q", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 0, "\n".join(errors) + run.stdout[-2000:] + run.stderr[-2000:]
    return run


def kill_every_process_of(argument: str) -> None:
    """SIGKILL every process whose command line holds ``argument`` (a unique path)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def union_of_cores(plan: CorePlan, tasks: list[str]) -> dict[str, torch.Tensor]:
    """Brute force: the union of the tasks' cores (every entry sorted by the whole key)."""
    base = load_file(str(Path(plan.base_model) / "model.safetensors"))
    chosen = [t for t in plan.tasks if t.name in tasks]
    if not chosen:
        return {}
    models = [load_file(str(Path(t.model) / "model.safetensors")) for t in chosen]
    found = brute_force(base, models, plan.core_fraction, seed=plan.tie_seed)
    masks: dict[str, torch.Tensor] = {}
    for per_task in found["masks"]:
        for name, m in per_task.items():
            m = m.reshape(base[name].shape)
            masks[name] = masks[name] | m if name in masks else m
    return masks


def check_stages(report: dict, out: Path, merged: Path) -> None:
    """At every stage end the earlier groups' cores are bit-identical; the rest trains."""
    plan = CorePlan.load(merged)
    previous = weights(merged)
    for k, stage in enumerate(report["stages"], 1):
        masks = union_of_cores(plan, [t for g in plan.groups[: k - 1] for t in g])
        assert stage["frozen_entries"] == sum(int(m.sum()) for m in masks.values())
        assert stage["ranks_agree"] is True
        now = weights(out / "stages" / str(k))
        moved = 0
        for name, m in masks.items():
            key = name if name in now else "model.embed_tokens.weight"  # tied head
            assert now[key].dtype == previous[key].dtype
            assert torch.equal(as_bits(now[key][m]), as_bits(previous[key][m])), (k, name)
        for name in now:
            moved += int((now[name] != previous[name]).sum())
        assert moved > 0.5 * sum(v.numel() for v in now.values()) - stage["frozen_entries"]
        if stage["frozen_entries"]:  # the gradients were masked, not only the values restored
            assert stage["masked_gradients"] > 0
        previous = now


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """One FSDP run under torchrun, the Trainer's own fsdp keys in the config."""
    root = tmp_path_factory.mktemp("fsdp")
    training = {**FSDP_KEYS, "save_steps": 1}
    cfg = consolidation_config(root, world, samples_per_task=8, training=training)
    out = root / "straight"
    launch(torchrun(), cfg, out)
    return cfg, out


def test_fsdp_freezes_exactly_and_matches_one_process(world, straight, tmp_path):
    cfg, out = straight
    report = json.loads((out / "consolidation_report.json").read_text())
    assert report["world_size"] == 2 and report["parameters_sharded"] is True
    assert report["sharding"]["requested_by"] == "training.fsdp"
    check_stages(report, out, world["merged"])
    for stage in report["stages"][1:]:  # each process stores about its half of the positions
        assert 0 < stage["freezer_bytes"] < 0.75 * 8 * stage["frozen_entries"]
    # one process, the same global batch (2 x 4 = 8): the same training, up to float order
    single = consolidation_config(
        tmp_path, world, samples_per_task=8, training={"per_device_train_batch_size": 8}
    )
    consolidate(single, tmp_path / "single", progress=False)
    a, b, merged = weights(out), weights(tmp_path / "single"), weights(world["merged"])
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
    diff = sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5
    update = sum(float((a[k] - merged[k]).double().norm() ** 2) for k in a) ** 0.5
    assert diff / update < TOLERANCE


@pytest.mark.fsdp
@pytest.mark.parametrize(
    ("pause_at", "resumed_from"),
    [("stage-2:step-2", "stage-2/checkpoint-1"), ("stage", "stage-1/done")],
    ids=["inside-a-stage", "between-stages"],
)
def test_fsdp_resume_equals_the_uninterrupted_run(straight, tmp_path, pause_at, resumed_from):
    """Killed (every process) inside stage 2, or right after stage 1; resumed from shards."""
    cfg, done = straight
    out = tmp_path / "resumed"
    marker = tmp_path / "paused"
    env = {"CPI_PAUSE_AT": pause_at, "CPI_PAUSE_MARKER": str(marker)}
    proc = launch(torchrun(), cfg, out, env=env, wait=False)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[0][-3000:]
    kill_every_process_of(str(out))  # the launcher and its workers (their own sessions)
    proc.wait()
    work = out.parent / f".{out.name}.work"
    assert (work / resumed_from / "sharded" / ".metadata").exists()
    if pause_at == "stage":  # nothing of stage 2 was saved: it restarts from stage 1's end
        assert not (work / "stage-2").exists()
    assert not out.exists()
    launch(torchrun(), cfg, out, "--resume")
    a, b = weights(done), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(as_bits(a[k]), as_bits(b[k])) for k in a)


ACCELERATE_FSDP2_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
mixed_precision: bf16
use_cpu: true
main_process_port: {port}
fsdp_config:
  fsdp_version: 2
"""


@pytest.mark.fsdp
def test_accelerate_fsdp2_config_bf16_tied(tmp_path_factory):
    """accelerate launch with an FSDP2 config: bf16 mixed precision, tied embeddings."""
    from helpers.consolidation_world import build_world

    root = tmp_path_factory.mktemp("bf16")
    world = build_world(root, tied=True, dtype="bfloat16")
    cfg = consolidation_config(root, world, samples_per_task=8)  # no fsdp keys: the launcher
    accelerate = root / "fsdp2.yaml"
    accelerate.write_text(ACCELERATE_FSDP2_CPU.format(port=free_port()))
    out = root / "out"
    launch(["-m", "accelerate.commands.launch", "--config_file", str(accelerate)], cfg, out)
    report = json.loads((out / "consolidation_report.json").read_text())
    assert report["parameters_sharded"] is True
    assert report["sharding"] == {
        "requested_by": "accelerate launch",
        "mixed_precision": True,
        "cpu_offload": False,
    }
    check_stages(report, out, world["merged"])  # bit-identical in bf16, the saved dtype
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    assert "lm_head.weight" not in weights(out)  # tied, stored once, like the input


@pytest.mark.fsdp
def test_fsdp_probes_match_one_process(world, tmp_path):
    """``cpi-consolidate probe`` sharded over 2 processes: the same probes as one process."""
    import yaml

    from consolidation.probe import run_probes

    from helpers.consolidation_world import TRAINING

    def config(name, **training):
        doc = {
            "model": str(world["base"]),
            "data": {k: str(v) for k, v in world["data"].items()},
            "samples_per_task": 8,
            "training": {**TRAINING, **training},
        }
        (tmp_path / name).write_text(yaml.safe_dump(doc))
        return tmp_path / name

    sharded = tmp_path / "sharded"
    cmd = [sys.executable, *torchrun(), "-m", "consolidation.cli", "probe"]
    cmd += [str(config("fsdp.yml", **FSDP_KEYS)), str(sharded), "-q"]
    run = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    single = tmp_path / "single"
    run_probes(config("one.yml", per_device_train_batch_size=8), single, progress=False)
    base = weights(world["base"])
    for task in world["data"]:
        a, b = weights(sharded / task), weights(single / task)
        assert a.keys() == b.keys() == base.keys()
        assert all(a[k].dtype == base[k].dtype for k in a)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
    reports = [json.loads((f / "probes_report.json").read_text()) for f in (sharded, single)]
    for task in world["data"]:
        norms = [r[task]["relative_update_norm"] for r in reports]
        assert norms[0] > 0 and norms[0] == pytest.approx(norms[1], rel=1e-3)
