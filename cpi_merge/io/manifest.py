"""``cpi_manifest.json``: sizes and SHA-256 of every input and output file of a merge.

safetensors has no checksum of its own, so ``cpi-merge`` records the SHA-256 of every
input and output file. Hashing a 7B checkpoint is seconds of CPU; the inputs' hashes do
not depend on the merge, so ``cpi-merge`` makes its :class:`Manifest` and starts hashing
the inputs in a background thread before it even imports mergekit; the merge then uses
those digests, provided no file changed since (same names, sizes and modification
times), else it hashes again. ``update`` releases the GIL, so the hashing runs beside
the imports and the merge on the other core. The manifest is written last: a folder
with a manifest is a complete one.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
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


def hash_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> dict:
    """Size and SHA-256 of one file.

    The file is mapped and hashed in windows of ``_WINDOW`` bytes straight from the page
    cache (no copy: copying blocks out slowed the mergekit import this runs beside);
    once hashed, each window's pages are dropped from this process (``MADV_DONTNEED``,
    where the platform has it), so its resident memory grows by about one window. A
    file truncated while mapped kills the process (SIGBUS), exactly as it would in
    safetensors' own memory-mapped loading of the same checkpoints.

    Args:
        path: The file.
        progress: Called with the size of each window once it is hashed.

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
                    if progress is not None:
                        progress(stop - start)
    return {"bytes": size, "sha256": digest.hexdigest()}


def hash_folder(
    folder: str | os.PathLike,
    progress: Callable[[int], None] | None = None,
    stamps: list[FileStamp] | None = None,
) -> dict[str, dict]:
    """Size and SHA-256 of every model file directly in ``folder``, by file name.

    Args:
        folder: The folder.
        progress: Called with each hashed window's size (see :func:`hash_file`).
        stamps: The files to hash, as listed already (default: list them now).
    """
    folder = Path(folder)
    stamps = _stamps(folder) if stamps is None else stamps
    return {name: hash_file(folder / name, progress) for name, _, _ in stamps}


MANIFEST_FILE = "cpi_manifest.json"


class _Worker:
    """One daemon thread running hashing jobs in order (an exit never waits for it)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], dict]) -> Future:
        future: Future = Future()
        self._queue.put((future, job))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cpi-hash", daemon=True)
            self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            future, job = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for it
                future.set_exception(exc)


class Manifest:
    """Hashes a merge's input and output folders in the background and writes the record.

    Args:
        enabled: False: nothing is hashed, and the record lists no files (``--no-checksums``).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._worker = _Worker()
        self._inputs: dict[str, tuple[list[FileStamp], Future]] = {}
        self._output: Future | None = None
        self._lock = threading.Lock()
        self._queued = 0  # bytes handed to the worker, and bytes it has hashed
        self._hashed = 0

    def _count(self, n: int) -> None:  # the worker's progress (one writer: the worker)
        self._hashed += n

    def hash_inputs(self, folders: Iterable[str | os.PathLike]) -> None:
        """Start hashing these folders (ones already started, or not folders, are skipped)."""
        if not self.enabled:
            return
        with self._lock:
            for folder in folders:
                key = os.path.realpath(folder)
                if key in self._inputs or not os.path.isdir(key):
                    continue
                try:
                    stamps = _stamps(Path(key))
                except OSError:
                    continue
                job = self._worker.submit(
                    lambda key=key, stamps=stamps: hash_folder(key, self._count, stamps)
                )
                self._queued += sum(size for _, size, _ in stamps)
                self._inputs[key] = (stamps, job)

    def input_digests(self, folder: str | os.PathLike) -> dict[str, dict] | None:
        """Digests of an input folder: the background result if its files are unchanged.

        Returns:
            Size and SHA-256 per file name; None when the manifest is disabled.
        """
        if not self.enabled:
            return None
        key = os.path.realpath(folder)
        with self._lock:
            started = self._inputs.pop(key, None)
        if started is not None:
            stamps, job = started
            try:
                digests = job.result()
            except (OSError, ValueError):  # e.g. a file emptied after it was listed
                digests = None
            if digests is not None and stamps == _stamps(Path(key)):
                return digests
        return hash_folder(folder)

    def hash_output(self, folder: str | os.PathLike) -> None:
        """Start hashing the finished output folder (before the pictures are added)."""
        if self.enabled:
            stamps = _stamps(Path(folder))
            self._queued += sum(size for _, size, _ in stamps)
            self._output = self._worker.submit(lambda: hash_folder(folder, self._count, stamps))

    def _wait_with_progress(self) -> None:
        """Show a bar of the bytes hashed while the background hashing is not done yet."""
        pending = [job for _, job in self._inputs.values()]
        pending += [self._output] if self._output is not None else []
        if all(job.done() for job in pending):
            return
        from tqdm.auto import tqdm

        with tqdm(
            total=self._queued,
            initial=self._hashed,
            desc="checksums (SHA-256)",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            leave=False,
        ) as bar:
            while not all(job.done() for job in pending):
                wait(pending, timeout=0.25)
                bar.update(self._hashed - bar.n)

    def write(
        self,
        folder: Path,
        inputs: list[tuple[str, str, str]],
        *,
        progress: bool = False,
        **header: str,
    ) -> None:
        """Write ``cpi_manifest.json`` into ``folder``; call it last.

        Args:
            folder: The output folder being written.
            inputs: ``(role, reference, local path)`` of every input.
            progress: Show a progress bar if the hashing is still running.
            **header: Provenance fields written first (``created_by``, ``mergekit``).
        """
        if progress and self.enabled:
            self._wait_with_progress()
        record = {
            **header,
            "inputs": [
                {
                    "role": role,
                    "reference": reference,
                    "path": os.path.abspath(path),
                    "files": self.input_digests(path),
                }
                for role, reference, path in inputs
            ],
            "outputs": self._output.result() if self._output is not None else None,
        }
        (Path(folder) / MANIFEST_FILE).write_text(json.dumps(record, indent=1) + "\n")

    def cancel(self) -> None:
        """Drop hashing that has not started (a failed merge needs none of it)."""
        with self._lock:
            for _, job in self._inputs.values():
                job.cancel()
            self._inputs.clear()
        if self._output is not None:
            self._output.cancel()


def verify_output(folder: str | os.PathLike, *, extras: bool = True) -> tuple[int, list[str]]:
    """Hash a merge's output again and compare it with its ``cpi_manifest.json``.

    Args:
        folder: An output folder of ``cpi-merge``.
        extras: Also report model files the manifest does not list.

    Returns:
        ``(files checked, differences)``: a missing, resized or changed file, or a model
        file the manifest does not list; no differences means the folder is as written.

    Raises:
        OutputError: No readable manifest, or one written with ``--no-checksums``.
    """
    from cpi_merge.errors import OutputError

    folder = Path(folder)
    try:
        record = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{folder / MANIFEST_FILE}: no readable manifest ({exc})") from None
    expected = record.get("outputs")
    if not isinstance(expected, dict):
        raise OutputError(
            f"{folder / MANIFEST_FILE}: written with --no-checksums; nothing to verify against"
        )
    differences = []
    for name, want in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            differences.append(f"{name}: missing")
            continue
        got = hash_file(path)
        if got["bytes"] != want.get("bytes"):
            differences.append(f"{name}: {got['bytes']:,} bytes, manifest says {want['bytes']:,}")
        elif got["sha256"] != want.get("sha256"):
            differences.append(f"{name}: contents differ from the manifest (SHA-256)")
    listed = set(expected) | {MANIFEST_FILE}
    for name, _, _ in _stamps(folder) if extras else []:
        if name not in listed:
            differences.append(f"{name}: not in the manifest (added after the merge?)")
    return len(expected), differences
