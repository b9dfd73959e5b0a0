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
RESIDENT_ENOUGH = 0.8
"""Inputs at least this share in the page cache already count as fitting, whatever the room."""
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore: only bit 0 of each byte is defined
_SAMPLE_PAGES = 16  # pages per sampled run: 64 runs per mapped GiB, ~0.1% of the pages
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


def resident_share(paths: list[str], *, step: int = 1 << 30) -> float | None:
    """Share of these files' pages that are in the page cache now (``mincore``, sampled).

    Inputs already in the cache cost no disk read to hash at once, whatever the room
    says: at 2B on a 23.5 GiB machine the inputs (16 GB) sit near the room's limit, and
    a run that judged them not to fit hashed them behind the analysis, unforked (~47 s
    instead of ~33-38 s).

    Args:
        paths: Files.
        step: Bytes mapped at a time.

    Returns:
        The resident share in [0, 1], or None where it cannot be known (not Linux,
        no ``mincore``, a file that cannot be mapped).
    """
    import ctypes
    import mmap
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_fn, munmap, mincore = libc.mmap, libc.munmap, libc.mincore
    except (OSError, AttributeError):
        return None
    mmap_fn.restype = ctypes.c_void_p
    mmap_fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    step -= step % page
    total = resident = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, step):
                length = min(step, size - offset)
                addr = mmap_fn(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                try:
                    pages = (length + page - 1) // page
                    span = min(pages, _SAMPLE_PAGES)
                    vec = ctypes.create_string_buffer(span)
                    for first in _sample_starts(pages, span):
                        if mincore(addr + first * page, span * page, vec) != 0:
                            return None
                        resident += vec.raw.translate(_LOW_BIT).count(1)
                        total += span
                finally:
                    munmap(addr, length)
        finally:
            os.close(fd)
    return 1.0 if total == 0 else resident / total


def _sample_starts(pages: int, span: int, samples: int = 64) -> list[int]:
    """First pages of up to ``samples`` evenly spaced runs of ``span`` pages."""
    room = pages - span
    if room <= 0:
        return [0]
    n = min(samples, room // span + 1)
    return sorted({room * i // max(n - 1, 1) for i in range(n)})
