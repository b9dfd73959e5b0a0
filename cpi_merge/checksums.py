"""SHA-256 of model folders for ``cpi_manifest.json``, started as early as possible.

safetensors has no checksum of its own, so ``cpi-merge`` records the SHA-256 of every
input and output file. Hashing a 7B checkpoint is seconds of CPU; the inputs' hashes do
not depend on the merge, so ``cpi-merge`` starts them in a background thread before it
even imports mergekit (:func:`start_background`), and :func:`folder_digests` then uses
them, provided no file changed since (same names, sizes and modification times),
else it hashes again. ``update`` releases the GIL, so the hashing runs beside the
imports on the other core.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

HASHED_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja")
_WINDOW = 64 << 20  # a multiple of the page size

FileStamp = tuple[str, int, int]
"""(name, size, mtime_ns) of one file."""


def _stamps(folder: Path) -> list[FileStamp]:
    stamps = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(HASHED_SUFFIXES):
            st = p.stat()
            stamps.append((p.name, st.st_size, st.st_mtime_ns))
    return stamps


def hash_file(path: str | os.PathLike) -> dict:
    """Size and SHA-256 of one file.

    The file is mapped and hashed in windows of ``_WINDOW`` bytes straight from the page
    cache (no copy: copying blocks out slowed the mergekit import this runs beside);
    once hashed, each window's pages are dropped from this process (``MADV_DONTNEED``,
    where the platform has it), so its resident memory grows by about one window. A
    file truncated while mapped kills the process (SIGBUS), exactly as it would in
    safetensors' own memory-mapped loading of the same checkpoints.

    Returns:
        ``{"bytes": size, "sha256": hex digest}``.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return {"bytes": 0, "sha256": digest.hexdigest()}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            dontneed = getattr(mmap, "MADV_DONTNEED", None) if size > _WINDOW else None
            with memoryview(mapped) as view:
                for start in range(0, size, _WINDOW):
                    stop = min(start + _WINDOW, size)
                    digest.update(view[start:stop])  # releases the GIL
                    if dontneed is not None:
                        mapped.madvise(dontneed, start, stop - start)
    return {"bytes": size, "sha256": digest.hexdigest()}


def hash_folder(folder: str | os.PathLike) -> dict[str, dict]:
    """Size and SHA-256 of every model file directly in ``folder``, by file name."""
    folder = Path(folder)
    return {name: hash_file(folder / name) for name, _, _ in _stamps(folder)}


class _Job:
    def __init__(self, folder: Path):
        self.folder = folder
        self.stamps = _stamps(folder)
        self.result: Future[dict[str, dict]] = Future()


_JOBS: dict[str, _Job] = {}
_LOCK = threading.Lock()


def _run(jobs: list[_Job]) -> None:
    for job in jobs:
        if not job.result.set_running_or_notify_cancel():
            continue
        try:
            job.result.set_result({name: hash_file(job.folder / name) for name, _, _ in job.stamps})
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for it
            job.result.set_exception(exc)


def start_background(folders: Iterable[str | os.PathLike]) -> None:
    """Start hashing these folders in a daemon thread (best effort: errors are ignored).

    Args:
        folders: Local model folders; ones already started, or not folders, are skipped.
    """
    jobs = []
    with _LOCK:
        for folder in folders:
            key = os.path.realpath(folder)
            if key in _JOBS or not os.path.isdir(key):
                continue
            try:
                _JOBS[key] = job = _Job(Path(key))
            except OSError:
                continue
            jobs.append(job)
    if jobs:
        threading.Thread(target=_run, args=(jobs,), name="cpi-hash", daemon=True).start()


def folder_digests(folder: str | os.PathLike) -> dict[str, dict]:
    """:func:`hash_folder`, from the background job when its files are unchanged.

    Args:
        folder: A model folder.

    Returns:
        Size and SHA-256 of every model file in it, by file name.
    """
    key = os.path.realpath(folder)
    with _LOCK:
        job = _JOBS.pop(key, None)
    if job is not None:
        try:
            digests = job.result.result()
        except (OSError, ValueError):  # e.g. a file emptied after it was listed
            digests = None
        if digests is not None and job.stamps == _stamps(Path(key)):
            return digests
    return hash_folder(folder)
