"""Fault injection: kills, races, full and read-only disks, damaged files. Nothing is lost.

Every check asserts the error class (through the exit status and message), that nothing
complete-looking was written, and that an earlier output is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.synthetic import LlamaShape, TaskSpec, make_family

from helpers.faults import MERGE, Paused, run
from helpers.files import write_recipe

pytestmark = pytest.mark.faults


def digest(folder: Path) -> dict[str, str]:
    """Every file of a folder (and below), by path: its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A 3-task synthetic family and its merge, made once for the module."""
    root = tmp_path_factory.mktemp("family")
    shape = LlamaShape(vocab=64, hidden=32, intermediate=64, layers=3)
    specs = [TaskSpec(hot_layers=[i], shared=0.8, seed=i + 1) for i in range(3)]
    base, tasks = make_family(root / "fam", shape, specs, shard_bytes=20_000)
    recipe = write_recipe(root / "r.yml", base, tasks, core_fraction=0.05)
    reference = root / "reference"
    done = run([*MERGE, str(recipe), str(reference), "--quiet"])
    assert done.returncode == 0, done.stderr
    return base, tasks, recipe, reference


@pytest.fixture
def merge_inputs(family):
    return family[2], family[3]


@pytest.mark.parametrize("point", ["analysis", "merge", "write"])
def test_a_killed_merge_leaves_nothing_that_looks_complete(merge_inputs, tmp_path, point):
    recipe, reference = merge_inputs
    out = tmp_path / "out"
    killed = Paused([*MERGE, str(recipe), str(out), "--no-checksums"], point, tmp_path / "m")
    killed.kill()
    assert not out.exists()  # only hidden leftovers: the staging folder and the lock file
    assert leftovers(out) == [".out.lock", f".out.partial-{killed.pid}"]
    again = run([*MERGE, str(recipe), str(out), "--no-checksums"])
    assert again.returncode == 0, again.stderr  # the lock died with the process
    assert "left by a run that was killed" in again.stderr
    assert leftovers(out) == []  # the killed run's staging folder is gone
    assert digest(out)["model.safetensors"] == digest(reference)["model.safetensors"]


def test_a_killed_forced_rerun_keeps_the_previous_output(merge_inputs, tmp_path):
    recipe, reference = merge_inputs
    previous = tmp_path / "previous"
    __import__("shutil").copytree(reference, previous)
    before = digest(previous)
    Paused([*MERGE, str(recipe), str(previous), "--force"], "write", tmp_path / "m").kill()
    assert digest(previous) == before


def test_two_runs_into_one_output(merge_inputs, tmp_path):
    recipe, _ = merge_inputs
    out = tmp_path / "out"
    first = Paused([*MERGE, str(recipe), str(out), "--no-checksums"], "merge", tmp_path / "m")
    second = run([*MERGE, str(recipe), str(out), "--quiet"])
    assert second.returncode == 2
    assert f"another run (process {first.pid}) is writing the output" in second.stderr
    assert first.go_on().returncode == 0 and (out / "model.safetensors").exists()


def test_a_folder_that_appears_during_the_run_is_not_replaced(merge_inputs, tmp_path):
    recipe, _ = merge_inputs
    out = tmp_path / "out"
    run_ = Paused([*MERGE, str(recipe), str(out), "--no-checksums"], "write", tmp_path / "m")
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    done = run_.go_on()
    assert done.returncode == 2 and "appeared while this run was writing" in done.stderr
    assert digest(out) == {"mine.txt": hashlib.sha256(b"a user's file").hexdigest()}
    assert leftovers(out) == []


def _tmpfs(path: Path, size: str) -> Path:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a kernel that allows it)")
    return path


@pytest.fixture
def small_disk(tmp_path):
    disk = _tmpfs(tmp_path / "disk", "2m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def test_too_little_space_is_found_before_any_tensor_is_read(merge_inputs, small_disk):
    recipe, _ = merge_inputs
    (small_disk / "filler").write_bytes(b"\0" * 1_500_000)
    out = small_disk / "out"
    done = run(
        [*MERGE, str(recipe), str(out), "--quiet"],
        CPI_PAUSE_AT="analysis",
        CPI_PAUSE_MARKER=str(small_disk.parent / "never"),
    )
    assert done.returncode == 2 and "not enough free space" in done.stderr
    assert "needs about" in done.stderr and not (small_disk.parent / "never").exists()
    assert not out.exists() and leftovers(out) == []


def test_a_full_disk_while_writing_is_one_line(merge_inputs, small_disk, tmp_path):
    recipe, _ = merge_inputs
    out = small_disk / "out"
    run_ = Paused([*MERGE, str(recipe), str(out), "--no-checksums"], "merge", tmp_path / "m")
    free = __import__("shutil").disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 4096))  # someone fills the disk
    done = run_.go_on()
    assert done.returncode == 2, done.stderr
    assert "no space left on the device" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and leftovers(out) == []


def test_a_read_only_output_fails_at_once(merge_inputs, tmp_path):
    recipe, _ = merge_inputs
    disk = _tmpfs(tmp_path / "ro", "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        done = run(
            [*MERGE, str(recipe), str(disk / "out"), "--quiet"],
            CPI_PAUSE_AT="analysis",
            CPI_PAUSE_MARKER=str(tmp_path / "never"),
        )
        assert done.returncode == 2 and "Read-only file system" in done.stderr
        assert not (tmp_path / "never").exists()  # refused before any tensor was read
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_verify_finds_a_changed_byte(merge_inputs, tmp_path):
    _, reference = merge_inputs
    out = tmp_path / "checked"
    __import__("shutil").copytree(reference, out)
    ok = run([*MERGE, "verify", str(out)])
    assert ok.returncode == 0 and "files match" in ok.stdout
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    bad = run([*MERGE, "verify", str(out)])
    assert bad.returncode == 1 and "model.safetensors: contents differ" in bad.stderr


def test_remote_code_of_the_base_is_not_pointed_to(tmp_path):
    shape = LlamaShape(vocab=64, hidden=32, intermediate=64, layers=2)
    base, tasks = make_family(tmp_path / "fam", shape, [TaskSpec(seed=1), TaskSpec(seed=2)])
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    done = run([*MERGE, str(recipe), str(tmp_path / "out"), "--no-checksums"])
    assert done.returncode == 0, done.stderr
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map names remote code" in done.stderr


def test_a_killed_consolidation_resumes_to_the_same_weights(world, tmp_path):
    from safetensors.torch import load_file

    from helpers.consolidation_world import consolidation_config
    from helpers.faults import CONSOLIDATE

    cfg = consolidation_config(tmp_path, world, training={"save_steps": 1})
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert run([*CONSOLIDATE, str(cfg), str(straight), "-q"]).returncode == 0
    Paused([*CONSOLIDATE, str(cfg), str(out), "-q"], "stage", tmp_path / "m").kill()
    assert not out.exists()
    again = run([*CONSOLIDATE, str(cfg), str(out), "-q"])
    assert again.returncode == 2 and "--resume" in again.stderr  # nothing silently lost
    resumed = run([*CONSOLIDATE, str(cfg), str(out), "-q", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
