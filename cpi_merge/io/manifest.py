"""``cpi_manifest.json``: sizes and SHA-256 of every input and output file of a merge.

safetensors has no checksum of its own, so ``cpi-merge`` records the SHA-256 of every
input and output file. The inputs' hashes do not depend on the merge, so ``cpi-merge``
makes its :class:`Manifest` and starts hashing the inputs in a background thread before
it even imports mergekit; the merge then uses those digests, provided no file changed
since (same names, sizes and modification times), else it hashes again. ``update``
releases the GIL, so the hashing runs beside the imports and the merge on the other core.

When the merge runs the analysis, the checkpoints are *held* (``hash_inputs(hold=True)``)
and hashed behind the analysis's own first read (:meth:`Manifest.following`,
:mod:`cpi_merge.io.follow_hash`): a checkpoint larger than the page cache is then read
from disk once for both, not twice. Files whose digest an earlier run remembered and that
are unchanged since are not hashed (:mod:`cpi_merge.io.digest_memo`); the record marks
them. The manifest is written last: a folder with a manifest is a complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, wait
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cpi_merge.io.cache_room import (
    RESIDENT_ENOUGH,
    inputs_fit_in_cache,
    page_cache_room,
    resident_share,
)
from cpi_merge.io.digest_memo import DigestMemo, file_status
from cpi_merge.io.follow_hash import (
    FileStamp,
    FollowingHasher,
    ReadReporter,
    hash_span,
    reader_spans,
)

if TYPE_CHECKING:
    from cpi_merge.io.checkpoints import Checkpoint

LOG = logging.getLogger(__name__)
HASHED_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja")
_WINDOW = 64 << 20  # a multiple of the page size


def _listing(folder: Path) -> list[tuple[FileStamp, os.stat_result]]:
    """The model files directly in ``folder``, by name, with their status."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(HASHED_SUFFIXES):
            st = p.stat()
            files.append(((p.name, st.st_size, st.st_mtime_ns), st))
    return files


def _stamps(folder: Path) -> list[FileStamp]:
    return [stamp for stamp, _ in _listing(folder)]


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
            for start in range(0, size, _WINDOW):
                stop = min(start + _WINDOW, size)
                hash_span(digest, mapped, start, stop, drop=size > _WINDOW)
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
LOW_PRIORITY = 19
"""Nice value of input hashing that nothing waits for yet (see :func:`_at_low_priority`)."""


def _at_low_priority(job: Callable[[], None]) -> None:
    """Run ``job`` in this thread at nice :data:`LOW_PRIORITY` (Linux sets it per thread).

    Hashing that nothing waits for then takes only CPU time the merge leaves: on two
    cores, 2B parameters, the first merge of new inputs (16 GB hashed) took 39.8 s with
    it (and the analysis forked) against 47.8 s without (median of 4 interleaved
    rounds). A thread cannot raise its priority again: whoever comes to wait for the
    digests hands the rest over (:meth:`FollowingHasher.hand_over`).
    """
    try:
        tid = threading.get_native_id()
        nice = max(LOW_PRIORITY, os.getpriority(os.PRIO_PROCESS, tid))
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError):  # not supported here: hash at normal priority
        pass
    job()


class _Worker:
    """One daemon thread running hashing jobs in order (an exit never waits for it)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], dict]) -> Future:
        """Run ``job`` after the jobs before it; its result or exception goes to the future."""
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for it
                future.set_exception(exc)

        self.run_later(run)
        return future

    def run_later(self, job: Callable[[], None]) -> None:
        """Run ``job`` (which reports its own results) after the jobs before it."""
        self._queue.put(job)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cpi-hash", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._queue.get()()


class Manifest:
    """Hashes a merge's input and output folders in the background and writes the record.

    Args:
        enabled: False: nothing is hashed, and the record lists no files (``--no-checksums``).
        memo: Digests remembered from earlier runs (:mod:`cpi_merge.io.digest_memo`):
            unchanged input files are not hashed again, newly hashed ones are added.
            None: every input is hashed from its bytes (``--rehash``).
    """

    def __init__(self, enabled: bool = True, memo: DigestMemo | None = None):
        self.enabled = enabled
        self.memo = memo if enabled else None
        self._worker = _Worker()
        self._inputs: dict[str, tuple[list[FileStamp], Future]] = {}
        # Per input folder: digests taken from the memo, and every file's status when
        # its hashing started (what the memo records the new digests with).
        self._remembered: dict[str, dict[str, dict]] = {}
        self._status: dict[str, dict[str, os.stat_result]] = {}
        self._started_ns = 0
        self._low_priority: list[FollowingHasher] = []  # hashed in a thread of their own
        self._count_lock = threading.Lock()
        self._hashers: dict[str, FollowingHasher] = {}  # by input folder
        self._output: Future | None = None
        self._lock = threading.Lock()
        self._queued = 0  # bytes handed to the worker, and bytes it has hashed
        self._hashed = 0

    def _count(self, n: int) -> None:  # progress of whichever thread hashes
        with self._count_lock:
            self._hashed += n

    def hash_inputs(self, folders: Iterable[str | os.PathLike], *, hold: bool = False) -> None:
        """Start hashing these folders (ones already started, or not folders, are skipped).

        Args:
            folders: The input folders.
            hold: Hash their ``.safetensors`` files only as the analysis reads them
                (:meth:`following`), or once :meth:`release` is called; every other
                file is hashed at once. Whatever waits for a digest releases first.
                Ignored when the checkpoints fit in the page cache or are mostly in
                it already (:mod:`cpi_merge.io.cache_room`): hashing them at once then
                costs no extra read and runs while mergekit is imported.
        """
        if not self.enabled:
            return
        with self._lock:
            self._started_ns = self._started_ns or time.time_ns()
            new: dict[str, list[FileStamp]] = {}  # every file, and the files to hash
            to_hash: dict[str, list[FileStamp]] = {}
            for folder in folders:
                key = os.path.realpath(folder)
                if key in self._inputs or key in new or not os.path.isdir(key):
                    continue
                try:
                    listing = _listing(Path(key))
                except OSError:
                    continue
                new[key] = [stamp for stamp, _ in listing]
                self._status[key] = {stamp[0]: st for stamp, st in listing}
                known = {}
                for (name, _, _), st in listing if self.memo is not None else []:
                    remembered = self.memo.lookup(os.path.join(key, name), st)
                    if remembered is not None:
                        known[name] = remembered
                self._remembered[key] = known
                to_hash[key] = [stamp for stamp in new[key] if stamp[0] not in known]
            if not new:
                return
            if hold:
                held = [
                    (os.path.join(key, name), size)
                    for key, stamps in to_hash.items()
                    for name, size, _ in stamps
                    if name.endswith(".safetensors")
                ]
                tensors = sum(size for _, size in held)
                hold = (
                    not inputs_fit_in_cache(tensors, page_cache_room())
                    and (resident_share([path for path, _ in held]) or 0.0) < RESIDENT_ENOUGH
                )
            hasher = FollowingHasher(to_hash, hold=hold, progress=self._count)
            for key, stamps in new.items():
                self._queued += sum(size for _, size, _ in to_hash[key])
                self._inputs[key] = (stamps, hasher.futures[key])
                self._hashers[key] = hasher
            if hasher.holds or sys.platform != "linux":
                self._worker.run_later(hasher.run)
                return
            # Nothing waits for these digests until the manifest is written: hash them at
            # low priority in a thread of their own; write() hands what is left over to
            # a thread at normal priority (a busy machine must not starve them).
            self._low_priority.append(hasher)
            threading.Thread(
                target=_at_low_priority, args=(hasher.run,), name="cpi-hash-inputs", daemon=True
            ).start()

    def yields_cpu(self, folders: Iterable[str | os.PathLike]) -> bool:
        """Whether these folders are hashed at low priority, behind the merge.

        Args:
            folders: Input folders.

        Returns:
            True when every one of them was started and none is held for the analysis's
            read (held inputs are hashed at normal priority, beside it).
        """
        with self._lock:
            keys = {os.path.realpath(f) for f in folders}
            return bool(keys) and all(self._hashers.get(k) in self._low_priority for k in keys)

    def _hurry(self) -> None:
        """Move low-priority hashing to a thread at the caller's priority (it waits now)."""
        with self._lock:
            hashers, self._low_priority = self._low_priority, []
        for hasher in hashers:
            hasher.hand_over()

    def bytes_to_hash(self, folders: Iterable[str | os.PathLike]) -> int:
        """Bytes this run hashes for these folders (none when the manifest is disabled).

        Args:
            folders: Input folders.

        Returns:
            For started folders, the size of their files not remembered from an earlier
            run (hashed or not yet); for the others, the size of every file in them.

        Raises:
            OSError: A folder not started cannot be listed.
        """
        if not self.enabled:
            return 0
        total = 0
        with self._lock:
            for folder in dict.fromkeys(os.path.realpath(f) for f in folders):
                if folder in self._inputs:
                    known = self._remembered.get(folder, {})
                    stamps = self._inputs[folder][0]
                    total += sum(size for name, size, _ in stamps if name not in known)
                else:
                    total += sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
        return total

    def _live_hashers(self) -> list[FollowingHasher]:
        with self._lock:
            return list({id(h): h for h in self._hashers.values()}.values())

    def release(self) -> None:
        """Let every held input be hashed as fast as possible (no analysis follows)."""
        for hasher in self._live_hashers():
            hasher.release_all()

    @contextmanager
    def following(self, readers: Sequence[Checkpoint], names: Iterable[str]) -> Iterator[None]:
        """Hash the held inputs behind these checkpoints' reads, until the block ends.

        Each reader's folder is hashed as far as the reader has reported reading
        (:meth:`Checkpoint.mark_read`), every byte it will not read (the header, tensors
        not in ``names``) at once; held folders of no reader are released at once. On
        leaving the block, normally or by an exception, everything is released.

        Args:
            readers: The checkpoints the analysis reads (base and tasks).
            names: The tensors it reads from each of them.
        """
        names = set(names)
        expected: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (folder, file): ranges
        hooked: list[Checkpoint] = []
        try:
            for ckpt in readers if self.enabled else []:
                key = os.path.realpath(ckpt.path)
                hasher = self._hashers.get(key)
                if hasher is None or not hasher.holds or not ckpt.is_safetensors:
                    continue  # nothing waits for this reader: no headers read, no hook
                spans = reader_spans(ckpt, names)
                for shard, by_name in spans.items():
                    expected.setdefault((key, shard), []).extend(by_name.values())
                ckpt.on_read = ReadReporter(hasher, key, spans)
                hooked.append(ckpt)
            for hasher in self._live_hashers():
                hasher.follow(expected)
            yield
        finally:
            for ckpt in hooked:
                ckpt.on_read = None
            done = [h.hashed_bytes for h in self._live_hashers()]
            LOG.debug(
                "SHA-256 of the inputs: %.2f of %.2f GiB hashed during the analysis",
                sum(d for d, _ in done) / 2**30,
                sum(t for _, t in done) / 2**30,
            )
            self.release()

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
            hasher = self._hashers.get(key)
        if started is not None:
            stamps, job = started
            self._hurry()
            if hasher is not None:
                hasher.release_all()  # needed now: never wait for a read that may not come
            try:
                digests = job.result()
            except (OSError, ValueError, CancelledError):  # e.g. a file emptied after listing
                digests = None
            if digests is not None and self._unchanged(key):
                self._remember(key, digests)
                known = self._remembered.get(key, {})
                return {name: digests.get(name) or known[name] for name, _, _ in stamps}
        return hash_folder(folder)

    def _unchanged(self, folder: str) -> bool:
        """Same files as listed, each with the same status (inode, size, mtime, ctime)."""
        listed = {name: file_status(st) for name, st in self._status.get(folder, {}).items()}
        return listed == {stamp[0]: file_status(st) for stamp, st in _listing(Path(folder))}

    def _remember(self, folder: str, digests: dict[str, dict]) -> None:
        """Offer the memo the digests just hashed from the files' bytes."""
        status = self._status.get(folder, {})
        for name, digest in digests.items() if self.memo is not None else []:
            if name in status:
                self.memo.remember(
                    os.path.join(folder, name), digest, status[name], self._started_ns
                )

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
        self.release()
        self._hurry()
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
        if self.memo is not None:
            self.memo.save()

    def cancel(self) -> None:
        """Stop the input hashing and drop output hashing not yet started (a failed merge)."""
        for hasher in self._live_hashers():
            hasher.cancel()
        with self._lock:
            self._inputs.clear()
            self._hashers.clear()
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
