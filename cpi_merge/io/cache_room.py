"""How much of the inputs the page cache can hold: decides how the inputs are hashed.

When every input checkpoint fits in the page cache, hashing them at once (beside
mergekit's import, on the idle core) reads them into the cache that the analysis then
finds warm. When they do not fit, a hash running ahead of the analysis is an extra read
of every input from disk, so ``cpi-merge`` hashes them behind the analysis's own read
instead (:meth:`cpi_merge.io.manifest.Manifest.following`), which costs CPU time in the
analysis: measured on 0.47B inputs that fit, 16.4 s instead of 14.0 s end to end.
"""

from __future__ import annotations

from pathlib import Path

FIT_SHARE = 0.8
"""Inputs up to this share of the room count as fitting (the output needs cache too)."""
_NO_LIMIT = 1 << 60


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit(proc_cgroup: Path, root: Path) -> int | None:
    """The memory limit of this process's cgroup (v1 or v2), or None when unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):  # cgroup v1
            candidate = root / "memory" / path.lstrip("/") / "memory.limit_in_bytes"
        elif controllers == "":  # cgroup v2 (unified)
            candidate = root / path.lstrip("/") / "memory.max"
        else:
            continue
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text != "max" and text.isdigit() and int(text) < _NO_LIMIT:
            return int(text)
    return None


def page_cache_room(
    meminfo: Path = Path("/proc/meminfo"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> int | None:
    """Bytes the page cache may hold for this process.

    Available memory, or the memory cgroup's limit when lower; None where neither can be
    read (not Linux).
    """
    available = _meminfo_available(meminfo)
    limit = _cgroup_limit(proc_cgroup, cgroup_root)
    known = [x for x in (available, limit) if x is not None]
    return min(known) if known else None


def inputs_fit_in_cache(input_bytes: int, room: int | None) -> bool:
    """Whether ``input_bytes`` of checkpoints fit in ``room`` (unknown room: assume so)."""
    return room is None or input_bytes <= FIT_SHARE * room
