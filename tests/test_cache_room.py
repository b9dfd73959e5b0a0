"""The page cache's room for the inputs, from /proc and the memory cgroup (v1 and v2)."""

from __future__ import annotations

import os
import sys

import pytest

from cpi_merge.io.cache_room import inputs_fit_in_cache, page_cache_room, resident_share


def _files(tmp_path, cgroup_line, limit_path=None, limit=None):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  32000000 kB\nMemAvailable:  20000000 kB\n")
    proc = tmp_path / "cgroup"
    proc.write_text(cgroup_line)
    root = tmp_path / "sys"
    if limit_path:
        (root / limit_path).parent.mkdir(parents=True)
        (root / limit_path).write_text(limit)
    return {"meminfo": meminfo, "proc_cgroup": proc, "cgroup_root": root}


def test_available_memory_without_a_limit(tmp_path):
    unlimited = _files(tmp_path, "9:memory:/\n", "memory/memory.limit_in_bytes", str(2**63 - 4096))
    assert page_cache_room(**unlimited) == 20000000 * 1024


def test_a_cgroup_v1_limit_below_available_memory(tmp_path):
    limit = "memory/bench/memory.limit_in_bytes"
    files = _files(tmp_path, "4:cpu:/\n9:memory:/bench\n", limit, "10737418240\n")
    assert page_cache_room(**files) == 10 << 30


def test_a_cgroup_v2_limit_and_max(tmp_path):
    files = _files(tmp_path, "0::/job\n", "job/memory.max", "4294967296\n")
    assert page_cache_room(**files) == 4 << 30
    (tmp_path / "sys" / "job" / "memory.max").write_text("max\n")
    assert page_cache_room(**files) == 20000000 * 1024


def test_nothing_readable_means_unknown_and_fitting(tmp_path):
    missing = tmp_path / "none"
    assert page_cache_room(missing, missing, missing) is None
    assert inputs_fit_in_cache(10**15, None)
    assert inputs_fit_in_cache(8, 10) and not inputs_fit_in_cache(9, 10)


@pytest.mark.skipif(sys.platform != "linux", reason="mincore is measured on Linux")
def test_resident_share_sees_pages_in_and_out_of_the_cache(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(8 << 20))  # just written: in the page cache
    assert resident_share([str(path)]) >= 0.9
    assert resident_share([str(path)], step=1 << 20) >= 0.9  # several mappings, sampled
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    share = resident_share([str(path)])
    if share > 0.5:
        pytest.skip("this file system keeps the pages (tmpfs?)")
    assert share <= 0.1
    with open(path, "rb") as f:  # read again: back in
        f.read()
    assert resident_share([str(path)]) >= 0.9
    assert resident_share([str(tmp_path / "missing")]) is None


def test_inputs_in_the_cache_are_not_held_even_when_the_room_says_they_do_not_fit(
    tmp_path, monkeypatch
):
    from cpi_merge.io import manifest as manifest_module
    from cpi_merge.io.manifest import Manifest

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(1 << 20))
    monkeypatch.setattr(manifest_module, "inputs_fit_in_cache", lambda *a: False)
    for share, held in [(1.0, False), (0.0, True), (None, True)]:
        monkeypatch.setattr(manifest_module, "resident_share", lambda paths, s=share: s)
        manifest = Manifest(memo=None)
        manifest.hash_inputs([folder], hold=True)
        try:
            assert manifest._hashers[str(folder.resolve())].holds == held, share
        finally:
            manifest.cancel()
