"""The page cache's room for the inputs, from /proc and the memory cgroup (v1 and v2)."""

from __future__ import annotations

from cpi_merge.io.cache_room import inputs_fit_in_cache, page_cache_room


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
