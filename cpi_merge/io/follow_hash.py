"""Hash input files behind the analysis's own read, so each byte comes from disk once.

SHA-256 is sequential: a file is hashed front to back. A *held* file is hashed only as
far as its *released* bytes reach: the analysis releases each tensor's bytes once it has
read them (they are in the page cache then), the header and every byte it will not read
are released when it starts, and everything is released when it ends, fails or does
not run at all. Ranges are released in any order and merged; the hasher reads only
through released bytes, and on its own through an unreleased gap of at most ``_GAP``
bytes (small tensors stored out of the stream's order, such as float32 norms stored
before the bfloat16 weights), so the watermark does not stall on them.

The reader reports each tensor it has read through ``Checkpoint.on_read``
(:class:`ReadReporter`). The analysis reads all models side by side, so one
:class:`FollowingHasher` hashes all the files of its folders interleaved (a window of
each ready file in turn), in one thread at a time: the background thread of the
:class:`~cpi_merge.io.manifest.Manifest`, or one at low priority that hands over to a
new thread when someone comes to wait (:meth:`FollowingHasher.hand_over`). Every wait
ends on a release or on :meth:`FollowingHasher.cancel`, and whoever needs a digest
releases first: nothing can wait forever, and a digest is only ever that of a whole
file.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cpi_merge.io.direct_read import read_header

if TYPE_CHECKING:
    from cpi_merge.io.checkpoints import Checkpoint, TensorInfo

_WINDOW = 64 << 20  # bytes hashed between two looks at the releases; a multiple of the page size
_GAP = 16 << 20  # unreleased bytes the hasher reads through on its own
HELD_SUFFIX = ".safetensors"  # the only files the analysis reads by byte range

FileStamp = tuple[str, int, int]
"""(name, size, mtime_ns) of one file."""


class ReleasedRanges:
    """Merged byte ranges ``[start, stop)`` of one file that may be hashed.

    Args:
        size: The file's size; ranges are clipped to it.
    """

    def __init__(self, size: int):
        self.size = size
        self._starts: list[int] = []
        self._stops: list[int] = []

    def add(self, start: int, stop: int) -> None:
        """Release ``[start, stop)`` (overlapping or touching ranges are merged)."""
        start, stop = max(0, start), min(stop, self.size)
        if start >= stop:
            return
        i = bisect.bisect_left(self._stops, start)  # first range that ends at or after start
        j = bisect.bisect_right(self._starts, stop)  # ranges [i, j) touch [start, stop)
        if i < j:
            start, stop = min(start, self._starts[i]), max(stop, self._stops[j - 1])
        self._starts[i:j], self._stops[i:j] = [start], [stop]

    def add_all(self) -> None:
        """Release the whole file."""
        self._starts, self._stops = [0], [self.size]

    def reach(self, position: int, gap: int | None = None) -> int:
        """How far a hasher at ``position`` may read.

        Args:
            position: Bytes hashed so far.
            gap: Longest unreleased stretch read through when released bytes follow it
                (default ``_GAP``).

        Returns:
            The end of the released bytes reached from ``position``; ``position`` itself
            when nothing beyond it is released (yet).
        """
        gap = _GAP if gap is None else gap
        reach = position
        for start, stop in zip(self._starts, self._stops, strict=True):
            if stop <= reach:
                continue
            if start - reach > gap:
                break
            reach = stop
        return reach

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The merged ranges, in order."""
        return list(zip(self._starts, self._stops, strict=True))


def safetensors_spans(path: str | os.PathLike) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where a safetensors file stores each tensor's bytes, from its header.

    Args:
        path: The file.

    Returns:
        ``(header end, {tensor name: (start, stop)})`` in absolute byte offsets.

    Raises:
        ValueError: The file does not start with a readable safetensors header.
        OSError: It cannot be read.
    """
    with open(path, "rb") as f:
        try:
            begin, entries = read_header(f)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    spans = {}
    for name, entry in entries.items():
        start, stop = entry["data_offsets"]
        spans[name] = (begin + int(start), begin + int(stop))
    return begin, spans


def hash_span(
    digest: hashlib._Hash, mapped: mmap.mmap, start: int, stop: int, *, drop: bool
) -> None:
    """Hash bytes ``[start, stop)`` of a mapped file; with ``drop``, then unmap their pages.

    Dropping (``MADV_DONTNEED``, where the platform has it) keeps this process's
    resident memory at about one span while a large file is hashed.
    """
    with memoryview(mapped) as view:
        digest.update(view[start:stop])  # releases the GIL
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    if drop and dontneed is not None:
        page = start - start % mmap.PAGESIZE
        mapped.madvise(dontneed, page, stop - page)


@dataclass(eq=False)
class _File:
    folder: str
    name: str
    size: int
    held: bool
    released: ReleasedRanges = field(init=False)
    hashed: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    mapped: mmap.mmap | None = None

    def __post_init__(self) -> None:
        self.released = ReleasedRanges(self.size)
        if not self.held:
            self.released.add_all()

    @property
    def done(self) -> bool:
        return self.hashed >= self.size

    def open(self) -> None:
        """Map the file (its size now is the one hashed; a changed file is caught later)."""
        with open(os.path.join(self.folder, self.name), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != self.size:  # changed since listed: hash what is there now, whole
                self.size, self.released = size, ReleasedRanges(size)
                self.released.add_all()
            if size:
                self.mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def hash_to(self, stop: int) -> int:
        """Hash ``[hashed, stop)``; return how many bytes that was."""
        start = self.hashed
        hash_span(self.digest, self.mapped, start, stop, drop=self.size > _WINDOW)
        self.hashed = stop
        return stop - start

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
            self.mapped = None


class FollowingHasher:
    """Hashes the files of some folders, one thread at a time, each as far as it is released.

    Args:
        folders: ``{folder: its files as listed}``.
        hold: Hold back the ``.safetensors`` files until released (see :meth:`follow`,
            :meth:`release`); other files (config, tokenizer, pickle) are released at once.
        progress: Called (in the hashing thread) with the size of each hashed window.

    Attributes:
        futures: Per folder, its ``{file name: {"bytes", "sha256"}}`` once every file of
            it is hashed; ``CancelledError`` after :meth:`cancel`, ``OSError`` when a file
            could not be read.
    """

    def __init__(
        self,
        folders: dict[str, list[FileStamp]],
        *,
        hold: bool,
        progress: Callable[[int], None] | None = None,
    ):
        self._files = {
            (folder, name): _File(folder, name, size, hold and name.endswith(HELD_SUFFIX))
            for folder, stamps in folders.items()
            for name, size, _ in stamps
        }
        self.futures: dict[str, Future] = {folder: Future() for folder in folders}
        self._progress = progress
        self._cond = threading.Condition()  # an RLock: _finish/_fail also run under it
        self._cancelled = False
        self._next = 0  # where the round over the files goes on
        self._runner: int | None = None  # the thread that hashes (see hand_over)
        self._begun = False
        self._window = threading.RLock()  # held while a file is hashed, opened or closed

    @property
    def holds(self) -> bool:
        """Whether any file waits for releases (False: everything is hashed at once)."""
        return any(f.held for f in self._files.values())

    @property
    def hashed_bytes(self) -> tuple[int, int]:
        """``(bytes hashed, bytes to hash)`` over every file."""
        with self._cond:
            files = list(self._files.values())
        return sum(f.hashed for f in files), sum(f.size for f in files)

    def follow(self, expected: dict[tuple[str, str], Iterable[tuple[int, int]]]) -> None:
        """Release, in every held file, all but the byte ranges a reader will release.

        Args:
            expected: Per ``(folder, file name)``, the ranges the reader will release as
                it reads them; held files not listed are released whole.
        """
        with self._cond:
            for key, f in self._files.items():
                if key not in expected:
                    f.released.add_all()
                    continue
                position = 0
                for start, stop in sorted(expected[key]):
                    f.released.add(position, start)
                    position = max(position, stop)
                f.released.add(position, f.size)
            self._cond.notify_all()

    def release(self, folder: str, name: str, start: int, stop: int) -> None:
        """Release ``[start, stop)`` of one file (unknown files are ignored)."""
        f = self._files.get((folder, name))
        if f is not None:
            with self._cond:
                f.released.add(start, stop)
                self._cond.notify_all()

    def release_all(self) -> None:
        """Release every byte of every file: hash on as fast as possible."""
        with self._cond:
            for f in self._files.values():
                f.released.add_all()
            self._cond.notify_all()

    def cancel(self) -> None:
        """Stop hashing after the current window; unfinished folders end cancelled."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _pick(self, me: int) -> tuple[_File, int] | None:
        """The next file to hash a window of, and how far; None when all are done.

        Waits (on the condition, which the caller holds) while no file is ready.

        Args:
            me: The calling thread: None is returned once another one took over.

        Raises:
            CancelledError: :meth:`cancel` was called.
        """
        while True:
            if self._runner != me:
                return None
            if self._cancelled:
                raise CancelledError("input hashing cancelled")
            pending = [f for f in self._files.values() if not f.done]
            if not pending:
                return None
            for i in range(len(pending)):  # round robin: releases come to all files at once
                f = pending[(self._next + i) % len(pending)]
                reach = f.released.reach(f.hashed)
                if reach > f.hashed:
                    self._next = (self._next + i + 1) % len(pending)
                    return f, min(reach, f.hashed + _WINDOW)
            self._cond.wait()

    def run(self) -> None:
        """Hash until every file is done or the hashing is cancelled (the worker's job).

        Returns at once if :meth:`hand_over` came first (its thread hashes instead).
        """
        self._take_over(first=True)

    def hand_over(self) -> threading.Thread | None:
        """Go on hashing in a new thread, created by the caller (so at its priority).

        The thread that ran :meth:`run` stops after its current window (which the new
        thread waits for: at most ``_WINDOW`` bytes). This lets a thread that waits for
        the digests move hashing started at low priority to its own priority (a thread
        cannot raise its own priority again).

        Returns:
            The new thread, or None when there is nothing left to hash.
        """
        with self._cond:
            if self._begun and all(f.done for f in self._files.values()):
                return None
        thread = threading.Thread(target=self._take_over, name="cpi-hash-now", daemon=True)
        thread.start()
        return thread

    def _take_over(self, first: bool = False) -> None:
        with self._cond:
            if first and self._begun:
                return
            self._runner = threading.get_ident()
            self._cond.notify_all()  # the old runner may wait for releases: it leaves
            if not self._begun:  # the first runner (or one that came before it started)
                self._begun = True
                for future in self.futures.values():
                    future.set_running_or_notify_cancel()
                for folder in self.futures:  # folders with no bytes to hash are done
                    self._finish(folder)
        self._hash_while_runner()

    def _hash_while_runner(self) -> None:
        """Hash windows until done, cancelled or another thread took over."""
        me = threading.get_ident()
        try:
            while True:
                with self._cond:
                    picked = self._pick(me)
                if picked is None:
                    break
                f, stop = picked
                with self._window:
                    if self._runner != me:  # taken over meanwhile: the new runner goes on
                        return
                    try:
                        if f.mapped is None:  # opened when first needed: few open at a time
                            f.open()
                        n = f.hash_to(min(stop, f.size)) if f.size else 0
                    except OSError as exc:  # e.g. removed after listing: the folder fails
                        self._fail(f.folder, exc)
                        continue
                    if f.done:
                        f.close()
                        self._finish(f.folder)
                if self._progress is not None:
                    self._progress(n)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for a folder
            if self._runner != me:  # taken over meanwhile: the new runner decides
                return
            for folder in list(self.futures):
                self._fail(folder, exc)
        with self._window, self._cond:
            if self._runner == me:
                for f in self._files.values():
                    f.close()

    def _finish(self, folder: str) -> None:
        with self._cond:
            future = self.futures[folder]
            files = [f for (d, _), f in self._files.items() if d == folder]
            if not future.done() and all(f.done for f in files):
                future.set_result(
                    {f.name: {"bytes": f.size, "sha256": f.digest.hexdigest()} for f in files}
                )

    def _fail(self, folder: str, exc: BaseException) -> None:
        """End a folder with ``exc`` and stop hashing its files."""
        with self._window, self._cond:  # never close a file while a window of it is hashed
            for key in [k for k in self._files if k[0] == folder]:
                self._files.pop(key).close()
            if not self.futures[folder].done():
                self.futures[folder].set_exception(exc)


def reader_spans(ckpt: Checkpoint, names: set[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per shard of ``ckpt``: the byte ranges of its tensors in ``names``, by name.

    A shard whose header cannot be read is left out (it is then hashed at once).
    """
    shards: dict[str, list[str]] = {}
    for name in names:
        info = ckpt.tensors.get(name)
        if info is not None:
            shards.setdefault(info.shard, []).append(name)
    spans = {}
    for shard, wanted in shards.items():
        try:
            _, where = safetensors_spans(os.path.join(ckpt.path, shard))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        spans[shard] = {n: where[n] for n in wanted if n in where}
    return spans


class ReadReporter:
    """A checkpoint's ``on_read``: releases the bytes of each tensor read to its hasher.

    Args:
        hasher: The hasher of the checkpoint's folder.
        folder: That folder, as the hasher knows it (real path).
        spans: Per file, the byte ranges of the tensors that will be reported.
    """

    def __init__(
        self, hasher: FollowingHasher, folder: str, spans: dict[str, dict[str, tuple[int, int]]]
    ) -> None:
        self._hasher, self._folder, self._spans = hasher, folder, spans

    def __call__(self, info: TensorInfo) -> None:
        """Release the bytes of tensor ``info`` (tensors not expected are ignored)."""
        span = self._spans.get(info.shard, {}).get(info.name)
        if span is not None:
            self._hasher.release(self._folder, info.shard, *span)
