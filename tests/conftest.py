"""Shared fixtures (helpers live in tests/helpers/)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from benchmarks.synthetic import LlamaShape, TaskSpec, make_family

_MEMO_DIR = tempfile.mkdtemp(prefix="cpi-digest-memo-")


def pytest_configure(config):
    """Remembered input digests go to a folder of this run, not the user's cache."""
    os.environ["CPI_MERGE_CACHE_DIR"] = _MEMO_DIR


def pytest_unconfigure(config):
    shutil.rmtree(_MEMO_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_digest_memo(monkeypatch, tmp_path_factory):
    """Each test starts with no remembered digests (else results depend on timing)."""
    monkeypatch.setenv("CPI_MERGE_CACHE_DIR", str(tmp_path_factory.mktemp("memo")))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Base, data, probes and their merge (tests/helpers/consolidation_world.py), made once."""
    from helpers.consolidation_world import build_world

    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def tiny_family(tmp_path):
    """A 3-task synthetic Llama family in bf16, sharded; tasks 0 and 1 overlap."""
    shape = LlamaShape(vocab=64, hidden=32, intermediate=64, layers=3)
    specs = [
        TaskSpec(hot_layers=[0, 1], shared=0.8, seed=1),
        TaskSpec(hot_layers=[0, 1], shared=0.8, seed=2),
        TaskSpec(hot_layers=[2], shared=0.8, seed=3),
    ]
    base, tasks = make_family(tmp_path / "fam", shape, specs, shard_bytes=20_000)
    return base, tasks
