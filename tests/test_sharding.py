"""Which sharding a config and launcher ask for, and where each process's rows are."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from consolidation.freezing.shards import local_rows
from consolidation.training.sharding import requested_sharding, unsharded_arguments
from cpi_merge.errors import ConfigError

LAUNCHER_VARIABLES = (
    "ACCELERATE_USE_FSDP",
    "FSDP_VERSION",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_USE_DEEPSPEED",
    "FSDP_OFFLOAD_PARAMS",
)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it


@given(rows=st.integers(0, 200), world=st.integers(1, 9))
def test_local_rows_follow_torch_chunk(rows, world):
    """FSDP2 splits dim 0 like torch.chunk (padded with empty chunks): the same rows."""
    ids = torch.arange(rows)
    chunks = list(torch.chunk(ids, world)) if rows else []
    chunks += [ids[:0]] * (world - len(chunks))
    covered = []
    for rank in range(world):
        start, end = local_rows(rows, world, rank)
        assert torch.equal(ids[start:end], chunks[rank])
        covered += range(start, end)
    assert covered == list(range(rows))  # every row on exactly one process


def test_no_sharding_unless_asked(monkeypatch, caplog):
    assert requested_sharding({"learning_rate": 1e-5}) is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to shard, said once
    assert requested_sharding({"fsdp": "full_shard", "fsdp_config": {"version": 2}}) is None
    assert "single process: nothing to shard" in caplog.text


def test_trainer_keys_ask_for_fsdp2():
    found = requested_sharding(
        {"fsdp": "full_shard auto_wrap offload", "fsdp_config": {"version": 2}, "bf16": True}
    )
    assert found is not None and found.requested_by == "training.fsdp"
    assert found.mixed_precision and found.cpu_offload
    assert unsharded_arguments({"fsdp": "x", "fsdp_config": {}, "bf16": True}) == {"bf16": True}


def test_accelerate_launch_asks_through_the_environment(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    found = requested_sharding({})
    assert found is not None and found.requested_by == "accelerate launch"
    assert found.mixed_precision and not found.cpu_offload


@pytest.mark.parametrize(
    ("arguments", "variables", "message"),
    [
        ({"deepspeed": "ds.json"}, {}, "DeepSpeed .* is not supported.*Use FSDP2"),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed \\(accelerate launch\\)"),
        ({"fsdp": "full_shard"}, {}, "version is 1: only FSDP2"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, {}, "only FSDP2"),
        ({"fsdp": "hybrid_shard", "fsdp_config": {"version": 2}}, {}, "cannot be honoured"),
        ({"fsdp_config": {"version": 2}}, {}, "training.fsdp is not"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 2}, "fp16": True}, {}, "use bf16"),
        ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1"),
        (
            {},
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "ACCELERATE_MIXED_PRECISION": "fp16",
            },
            "mixed_precision fp16",
        ),
    ],
)
def test_what_cannot_freeze_exactly_is_refused(monkeypatch, arguments, variables, message):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        requested_sharding(arguments)


def test_deepspeed_config_fails_before_any_training(world, tmp_path, monkeypatch):
    import consolidation.stages as stages

    from helpers.consolidation_world import consolidation_config

    monkeypatch.setattr(stages, "run_stage", lambda *a, **k: pytest.fail("training started"))
    cfg = consolidation_config(tmp_path, world, training={"deepspeed": "ds_config.json"})
    with pytest.raises(ConfigError, match="DeepSpeed"):
        stages.consolidate(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_fsdp_keys_in_a_single_process_train_the_whole_model(world, tmp_path, monkeypatch):
    """No launcher: nothing to shard; the keys are not handed to the Trainer (which refuses
    fsdp outside distributed training), and the run trains as usual."""
    import consolidation.stages as stages

    from helpers.consolidation_world import consolidation_config

    monkeypatch.delenv("WORLD_SIZE")
    training = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}
    cfg = consolidation_config(tmp_path, world, training=training)
    records = stages.consolidate(cfg, tmp_path / "out", progress=False)
    from cpi_merge.analysis.plan import CorePlan

    assert len(records) == len(CorePlan.load(world["merged"]).groups)
    assert all(r.steps > 0 for r in records)
    report = (tmp_path / "out" / "consolidation_report.json").read_text()
    assert '"sharding": null' in report
