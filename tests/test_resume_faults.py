"""Consolidation faults: a resume that would mix two runs, damaged state, a changed model."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from consolidation.stages import consolidate
from consolidation.workdir import work_dir_for
from cpi_merge.errors import CheckpointError, OutputError, ResumeError
from cpi_merge.io.output_lock import OutputLock

from helpers.consolidation_world import consolidation_config


def crash_in_stage_2_at(step, monkeypatch):
    """Make the next consolidation stop (as if killed) at ``step`` of stage 2."""
    from transformers import TrainerCallback

    import consolidation.stages as stages

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if "stage-2" in args.output_dir and state.global_step == step:
                raise KeyboardInterrupt("simulated crash")

    real = stages.run_stage
    monkeypatch.setattr(stages, "run_stage", lambda *a, **k: real(*a, callbacks=[Crash()], **k))
    return real


def interrupted(world, tmp_path, monkeypatch, *, step=2, **overrides):
    cfg = consolidation_config(tmp_path, world, training={"save_steps": 1}, **overrides)
    out = tmp_path / "out"
    real = crash_in_stage_2_at(step, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        consolidate(cfg, out, progress=False)
    monkeypatch.setattr("consolidation.stages.run_stage", real)
    return cfg, out


def test_a_resume_with_another_config_is_refused(world, tmp_path, monkeypatch):
    cfg, out = interrupted(world, tmp_path, monkeypatch)
    doc = yaml.safe_load(cfg.read_text())
    doc["training"]["learning_rate"] = 0.02
    changed = tmp_path / "changed.yml"
    changed.write_text(yaml.safe_dump(doc))
    with pytest.raises(ResumeError, match=r"training\.learning_rate: 0\.01 -> 0\.02"):
        consolidate(changed, out, progress=False, resume=True)
    data = next(iter(doc["data"].values()))
    with open(data, "a") as f:  # a data file that changed is named too
        f.write(json.dumps({"prompt": "rev:x>", "completion": "x"}) + "\n")
    with pytest.raises(ResumeError, match="data"):
        consolidate(cfg, out, progress=False, resume=True)
    assert not out.exists() and work_dir_for(out).exists()  # nothing lost either way


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    world, tmp_path, monkeypatch, caplog
):
    straight = tmp_path / "straight"
    cfg = consolidation_config(tmp_path, world, training={"save_steps": 1})
    consolidate(cfg, straight, progress=False)
    _, out = interrupted(world, tmp_path, monkeypatch, step=3)
    stage = work_dir_for(out) / "stage-2"
    assert sorted(p.name for p in stage.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    newest = stage / "checkpoint-2" / "optimizer.pt"
    damaged = bytearray(newest.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    newest.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        consolidate(cfg, out, progress=False, resume=True)
    assert "resuming from checkpoint-1" in caplog.text and "optimizer.pt" in caplog.text
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)  # resumed from checkpoint-1: the same run


def test_no_checkpoint_that_verifies_names_the_files(world, tmp_path, monkeypatch):
    cfg, out = interrupted(world, tmp_path, monkeypatch, step=2)
    for checkpoint in (work_dir_for(out) / "stage-2").glob("checkpoint-*"):
        (checkpoint / "scheduler.pt").write_bytes(b"damaged")
    with pytest.raises(ResumeError, match=r"checkpoint-1/scheduler\.pt: 7 bytes, sealed with"):
        consolidate(cfg, out, progress=False, resume=True)


def test_a_merged_model_changed_after_its_plan_is_refused(world, tmp_path):
    model = tmp_path / "merged"
    shutil.copytree(world["merged"], model)
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    cfg = consolidation_config(tmp_path, world, model=str(model))
    with pytest.raises(CheckpointError, match="changed since cpi-merge wrote it"):
        consolidate(cfg, tmp_path / "never", progress=False)


def test_a_second_run_into_the_same_output_is_refused(world, tmp_path):
    out = tmp_path / "out"
    cfg = consolidation_config(tmp_path, world)
    with OutputLock(out.resolve()):
        with pytest.raises(OutputError, match="another run .* is writing the output"):
            consolidate(cfg, out, progress=False)
