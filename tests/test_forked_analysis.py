"""cpi-merge's analysis forked before mergekit's import: the same files, errors and clean-up.

Each check runs the command line in a new process (a fork from pytest's own process,
where torch has already run, would keep the child to one thread).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.synthetic import LlamaShape, TaskSpec, make_family
from cpi_merge.analysis.analysis_wire import buffer_sizes, decode_analysis, encode_analysis
from cpi_merge.analysis.forked import fork_allowed
from cpi_merge.analysis.run import AnalysisOptions, run_analysis
from cpi_merge.cli.merge_ahead import MergeAhead, read_command_line
from cpi_merge.config.recipe import load_recipe
from cpi_merge.io.opened import open_models

from helpers.faults import MERGE, Paused, run
from helpers.files import write_recipe

FORKED = "while mergekit is imported"
needs_fork = pytest.mark.skipif(
    not fork_allowed(), reason="the analysis is forked on Linux with two cores or more only"
)
OUTS = ("forked", "alone")
OUTPUT_FILES = ("model.safetensors", "cpi_plan.json", "mergekit_config.yml", "config.json")


def _family(root: Path) -> Path:
    shape = LlamaShape(vocab=64, hidden=32, intermediate=64, layers=3)
    specs = [TaskSpec(hot_layers=[i], shared=0.8, seed=i + 1) for i in range(3)]
    base, tasks = make_family(root / "fam", shape, specs)
    return write_recipe(root / "r.yml", base, tasks, core_fraction=0.05)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return _family(tmp_path_factory.mktemp("forked"))


def test_the_analysis_crosses_the_pipe_exactly(recipe):
    """The child's answer, as bytes and back: the same plan, boundaries and positions."""
    sent = run_analysis(
        open_models(load_recipe(recipe)), AnalysisOptions(progress=False), keep_cores=True
    )
    header, arrays = encode_analysis(sent)
    got = decode_analysis(header, [bytearray(memoryview(a).cast("B")) for a in arrays])
    assert got.plan == sent.plan and got.cores.boundaries == sent.cores.boundaries
    assert got.cores.numel == sent.cores.numel
    for name, positions in sent.cores.positions.items():
        for a, b in zip(positions, got.cores.positions[name], strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert buffer_sizes(header) == [a.nbytes for a in arrays]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@needs_fork
def test_the_forked_analysis_writes_the_same_files(recipe, tmp_path):
    forked = run([*MERGE, str(recipe), str(tmp_path / "forked"), "-v"])
    assert forked.returncode == 0, forked.stderr
    assert FORKED in forked.stderr
    alone = run([*MERGE, str(recipe), str(tmp_path / "alone"), "-v"], CPI_NO_FORK="1")
    assert alone.returncode == 0, alone.stderr
    assert FORKED not in alone.stderr
    for name in OUTPUT_FILES:
        assert (tmp_path / "forked" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()

    manifests = [
        json.loads((tmp_path / d / "cpi_manifest.json").read_text()) for d in ("forked", "alone")
    ]
    assert manifests[0]["inputs"] == manifests[1]["inputs"]  # hashed behind the child's read


def test_an_error_in_the_forked_analysis_is_the_same_error(tmp_path):
    recipe = _family(tmp_path)
    shard = tmp_path / "fam" / "task_1" / "model.safetensors"
    tensors = load_file(str(shard))
    name = sorted(n for n in tensors if n.endswith("mlp.up_proj.weight"))[0]
    tensors[name].view(-1)[:3] = torch.tensor([float("nan"), float("nan"), float("inf")])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    errors = []
    for label, env in (("forked", {}), ("alone", {"CPI_NO_FORK": "1"})):
        done = run([*MERGE, str(recipe), str(tmp_path / label), "-v"], **env)
        assert done.returncode == 2, done.stderr
        assert (FORKED in done.stderr) == (label == "forked" and fork_allowed())
        assert not (tmp_path / label).exists() and leftovers(tmp_path / label) == []
        errors.append([line for line in done.stderr.splitlines() if line.startswith("error:")])
    assert errors[0] == errors[1] and "2 NaN and 1 Inf" in errors[0][0]


def _child_of(pid: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError(f"process {pid} has no child")


@pytest.mark.faults
@needs_fork
def test_a_killed_analysis_process_ends_the_merge_cleanly(recipe, tmp_path):
    out = tmp_path / "out"
    paused = Paused([*MERGE, str(recipe), str(out), "--no-checksums"], "analysis", tmp_path / "m")
    assert int((tmp_path / "m").read_text()) == paused.pid  # the run's pid, not the child's
    child = _child_of(paused.pid)
    os.kill(child, signal.SIGKILL)
    done = paused.go_on()
    assert done.returncode == 2, done.stderr
    assert f"process ({child}) ended without an answer (killed by signal 9)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and leftovers(out) == []


@pytest.mark.faults
@needs_fork
def test_a_killed_run_takes_its_analysis_process_with_it(recipe, tmp_path):
    out = tmp_path / "out"
    paused = Paused([*MERGE, str(recipe), str(out), "--no-checksums"], "analysis", tmp_path / "m")
    child = _child_of(paused.pid)
    paused.kill()
    assert _ends(child)


def _ends(pid: int) -> bool:
    """Whether ``pid`` ends (or is a zombie nobody reaped yet) within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("args", "read"),
    [
        (["r.yml", "out", "--seed", "3", "--cuda", "--quiet"], True),
        (["r.yml", "out", "--out-shard-size", "1B", "--strategy", "histogram"], True),
        (["--cuda", "r.yml", "out"], False),  # recipe not first: not read with certainty
        (["r.yml", "out", "--lora-merge-cache", "c"], False),
        (["r.yml", "out", "--help"], False),
        (["r.yml", "out", "--order", "sideways"], False),  # the full command reports it
    ],
)
def test_the_command_line_is_read_only_when_certain(args, read):
    values = read_command_line(args)
    assert (values is not None) == read
    if values is not None and "--seed" in args:
        assert values["analysis"]["seed"] == 3 and values["quiet"]


def test_an_analysis_started_for_other_arguments_is_not_used(tmp_path):
    ahead = MergeAhead.__new__(MergeAhead)  # only the arguments it was started with
    ahead.recipe, ahead.out_dir, ahead.force, ahead.allow_pickle = "r.yml", "out", False, False
    ahead.settings = AnalysisOptions(progress=True)
    same = dict(force=False, allow_pickle=False, settings=AnalysisOptions(progress=False))
    assert ahead.matches("r.yml", "out", **same)
    assert ahead.matches(Path("r.yml").resolve(), "./out", **same)
    assert not ahead.matches("r.yml", "other", **same)
    assert not ahead.matches("r.yml", "out", **{**same, "force": True})
    assert not ahead.matches("r.yml", "out", **{**same, "settings": AnalysisOptions(seed=1)})


@pytest.mark.parametrize(
    ("cores", "hashing", "size", "started", "fork"),
    [
        (2, True, 1 << 30, None, True),  # the hashes end during the import: a core is free
        (2, True, 9 << 30, None, False),  # import and hashes take both cores
        (2, True, 9 << 30, "held", False),  # hashed behind the read, at normal priority
        (2, True, 9 << 30, "low priority", True),  # hashed only on CPU the merge leaves
        (2, False, 9 << 30, None, True),
        (4, True, 9 << 30, None, True),
    ],
)
def test_the_analysis_is_forked_only_when_a_core_is_free(
    tmp_path, monkeypatch, cores, hashing, size, started, fork
):
    from cpi_merge.cli import merge_ahead
    from cpi_merge.io import manifest as manifest_module
    from cpi_merge.io.manifest import Manifest

    (tmp_path / "model.safetensors").write_bytes(b"")
    os.truncate(tmp_path / "model.safetensors", size)  # sparse: takes no disk
    monkeypatch.setattr(merge_ahead, "usable_cores", lambda: cores)
    monkeypatch.setattr(manifest_module, "inputs_fit_in_cache", lambda *a: started != "held")
    monkeypatch.setattr(manifest_module, "resident_share", lambda paths: 0.0)
    if started == "low priority" and sys.platform != "linux":
        pytest.skip("per-thread priorities are Linux's")
    manifest = Manifest(enabled=hashing)
    if started is not None:
        manifest.hash_inputs([tmp_path], hold=True)
    try:
        assert merge_ahead._core_to_spare([str(tmp_path), str(tmp_path)], manifest) == fork
    finally:
        manifest.cancel()
