"""The scaling benchmark's table and size table (the timed runs themselves are benchmarks)."""

from __future__ import annotations

import sys

import pytest

from benchmarks.scaling import SIZES, MemoryGroup, print_table, run_measured, run_sizes


def test_sizes_are_the_stated_parameter_counts():
    stated = {"0.1": 0.10e9, "0.5": 0.47e9, "2": 2.01e9}
    for size, shape in SIZES.items():
        assert shape.num_parameters == pytest.approx(stated[size], rel=0.01)


def test_table_shows_medians_ratios_and_peak_rss(capsys):
    samples = {
        "task_arithmetic": [(10.0, 1000.0), (12.0, 1100.0), (11.0, 1050.0)],
        "cpi-analyze": [(5.0, 900.0), (6.0, 950.0), (4.0, 800.0)],
        "cpi-merge": [(13.0, 1000.0), (14.0, 1200.0), (15.0, 990.0)],
        "cpi-merge --rehash": [(17.0, 1000.0), (16.5, 1250.0), (99.0, 990.0)],
    }
    print_table([{"parameters": 2.01e9, "input_bytes": 16 * 2**30, "samples": samples}], 3, None)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    # medians 11 / 5 / 14 / 17, ratios 14/11 and 17/11; peak RSS is the largest sample of
    # either cpi-merge
    assert row == (
        "| 2.01B | 16.0 GiB | 11.00 | 5.00 | 14.00 | **1.27×** | 17.00 | **1.55×** "
        "| 1100 | 950 | 1250 | 1.14× |"
    )


def test_unknown_size_is_refused_with_the_allowed_ones(tmp_path):
    with pytest.raises(SystemExit, match="allowed: 0.1, 0.5, 2"):
        run_sizes(["70"], tmp_path, 3, 0.01, 1, None, None)


def test_cache_limit_without_cgroups_is_skipped_with_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.scaling.CGROUP_ROOT", tmp_path / "missing")
    assert MemoryGroup.unavailable_reason() is not None
    run_sizes(["0.1"], tmp_path, 3, 0.01, 1, 1.0, None)
    assert "--cache-limit skipped: no cgroup-v1 memory controller" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # nothing was made


def test_peak_memory_counts_a_forked_child_with_its_parent(tmp_path):
    """A parent and a forked child, each filling 300 MiB of its own, peak at ~600 MiB."""
    script = (
        "import os, time\n"
        "pid = os.fork()\n"
        "mine = b'x' * (300 << 20)\n"
        "time.sleep(0.5)\n"
        "os._exit(0) if pid == 0 else os.waitpid(pid, 0)\n"
    )
    _, peak = run_measured([sys.executable, "-c", script], tmp_path)
    assert peak > 500  # wait4 alone reports one process: about 300 MiB
