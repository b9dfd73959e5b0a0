"""Exact global top-k core selection over a stream of |θi − θ0| chunks (METHOD.md, Stage 1).

For each task i, the core threshold ``t_i`` is the exact k-th largest entry of
``Δi = |θi − θ0|`` over the whole model and the core is ``{j : Δi[j] >= t_i}`` (ties
included). This module only sees float32 chunks of Δ; reading checkpoints is
:mod:`cpi_merge.delta_stream`'s job. Two exact strategies, same results bit for bit:

* ``buffer`` — one pass. Per task, a running buffer keeps (value, global index) of every
  entry at or above a running lower bound of the k-th value and is pruned when it reaches
  2k entries. Fast; memory about 36 bytes per core entry per task at the peak.
* ``histogram`` — three passes, constant memory. A radix select on the float32 bit
  pattern (non-negative floats order like their bits): pass 1 counts the upper 19 bits,
  pass 2 counts the lower 12 bits inside the bucket that holds the k-th value, which
  gives the exact threshold; pass 3 counts core entries and intersections.

Entries with Δ = 0 never enter a core: a threshold of 0 would make the core the whole
model, which is reported as a :class:`DegenerateTaskError` instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpi_merge.errors import DegenerateTaskError

_LOW_BITS = 12
_HIGH_BUCKETS = 1 << (31 - _LOW_BITS)  # sign bit is 0 for |Δ|: 2^19 buckets
_LOW_BUCKETS = 1 << _LOW_BITS
# Peak bytes per core entry and task: a (float32 value, int64 index) buffer of 2k entries,
# plus the k kept entries gathered while pruning.
BUFFER_BYTES_PER_CORE_ENTRY = 3 * (4 + 8)


@dataclass(frozen=True)
class DeltaChunk:
    """A contiguous run of entries of one tensor, with |θi − θ0| for every task.

    Attributes:
        tensor_index: Position of the tensor in the tensor list of the stream.
        offset: Global flat index of the chunk's first entry (tensors laid end to end).
        deltas: One 1-D float32 tensor per task, all of the same length. They may be
            views of reused buffers: valid only until the next chunk is requested.

    """

    tensor_index: int
    offset: int
    deltas: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CoreSelection:
    """Exact core regions, summarised.

    Attributes:
        thresholds: ``t_i`` per task: the k-th largest Δi, a float32 value held exactly.
        counts: int64 array (tasks × tensors): core entries of task i in tensor j.
        intersections: int64 array (tasks × tasks): ``|Ci ∩ Cj|``; the diagonal is ``|Ci|``.
        positions: Per task, the sorted global indices of its core entries, when the
            strategy holds them at the end (``buffer``); else None.

    """

    thresholds: tuple[float, ...]
    counts: np.ndarray
    intersections: np.ndarray
    positions: tuple[np.ndarray, ...] | None = None

    @property
    def core_counts(self) -> tuple[int, ...]:
        """``|Ci|`` per task (at least k; larger when entries tie at the threshold)."""
        return tuple(int(x) for x in np.diag(self.intersections))


def float32_from_bits(bits: int) -> float:
    """Return the float32 value whose IEEE-754 bit pattern is ``bits``, as a Python float."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def float32_bits(value: float) -> int:
    """Return the IEEE-754 bit pattern of ``value`` rounded to float32."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _high_keys(values: torch.Tensor) -> torch.Tensor:
    # Non-negative float32 values order exactly like their bit patterns.
    return values.view(torch.int32) >> _LOW_BITS


def _top_bucket(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """Return (bucket holding the rank-th largest entry, entries in higher buckets)."""
    from_top = torch.flip(hist, dims=[0]).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=from_top.dtype)))
    bucket = hist.numel() - 1 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    return bucket, above


def _bucket_floor(bucket: int) -> float:
    """The smallest float32 value whose high key is ``bucket``."""
    return float32_from_bits(bucket << _LOW_BITS)


def kth_largest(values: torch.Tensor, k: int) -> float:
    """Return the exact k-th largest entry of a 1-D non-negative float32 tensor.

    A two-level radix select on the bit patterns (two ``bincount`` passes), several
    times faster than ``torch.kthvalue`` and without its copy of the input.

    Args:
        values: Finite, non-negative float32 values.
        k: Rank from the top, ``1 <= k <= len(values)``.

    """
    keys = _high_keys(values)
    bucket, above = _top_bucket(torch.bincount(keys, minlength=_HIGH_BUCKETS), k)
    low = values.view(torch.int32)[keys == bucket] & (_LOW_BUCKETS - 1)
    low_bits, _ = _top_bucket(torch.bincount(low, minlength=_LOW_BUCKETS), k - above)
    return float32_from_bits((bucket << _LOW_BITS) | low_bits)


def _degenerate(label: str, changed: int, k: int, total: int) -> DegenerateTaskError:
    return DegenerateTaskError(
        f"task {label!r}: only {changed:,} of {total:,} entries differ from the base, fewer "
        f"than k = {k:,} (core_fraction × total entries). Its core threshold would be 0, so "
        "its core would be the whole model. Check that this checkpoint really is a "
        "fine-tune of base_model, or lower core_fraction below "
        f"{changed / total:.3g}."
    )


class _TopKBuffer:
    """Running exact top-k of one task's Δ stream, keeping global indices.

    Candidates are appended into one preallocated (value, index) buffer and compacted in
    place when it reaches 2k entries, so a prune allocates only the kept entries.
    """

    def __init__(self, k: int, cut: float = 0.0):
        self.k = k
        self.cut = cut  # every entry >= cut (and > 0) seen so far is in the buffer
        self.initial_cut = cut
        self.values = torch.empty(0, dtype=torch.float32)
        self.indices = torch.empty(0, dtype=torch.int64)
        self.size = 0
        self.prune_at = 2 * k

    def _reserve(self, extra: int) -> None:
        need = self.size + extra
        if need <= self.values.numel():
            return
        capacity = max(need, self.prune_at + extra)
        values = torch.empty(capacity, dtype=torch.float32)
        indices = torch.empty(capacity, dtype=torch.int64)
        values[: self.size] = self.values[: self.size]
        indices[: self.size] = self.indices[: self.size]
        self.values, self.indices = values, indices

    def add(self, delta: torch.Tensor, offset: int) -> None:
        if self.cut > 0:
            if float(delta.max()) < self.cut:  # most chunks, once the cut is high
                return
            mask = delta >= self.cut
        else:
            mask = delta > 0
        local = mask.nonzero().squeeze(1)
        n = local.numel()
        if n == 0:
            return
        self._reserve(n)
        end = self.size + n
        torch.index_select(delta, 0, local, out=self.values[self.size : end])
        torch.add(local, offset, out=self.indices[self.size : end])
        self.size = end
        if self.size >= self.prune_at:
            self._prune()

    def _prune(self) -> None:
        values = self.values[: self.size]
        if self.size > self.k:
            # Raise the cut to the floor of the bucket holding the k-th largest value: a
            # lower bound of the final threshold, found with one bincount (no sort).
            keys = _high_keys(values)
            bucket, _ = _top_bucket(torch.bincount(keys, minlength=_HIGH_BUCKETS), self.k)
            keep = (keys >= bucket).nonzero().squeeze(1)
            del keys
            m = keep.numel()
            self.values[:m] = values.index_select(0, keep)
            self.indices[:m] = self.indices[: self.size].index_select(0, keep)
            self.size = m
            self.cut = max(self.cut, _bucket_floor(bucket))
        # Heavy ties at the cut can keep the buffer above 2k: grow the limit, don't thrash.
        self.prune_at = max(2 * self.k, 2 * self.size)

    def finish(self) -> tuple[int, float | None, np.ndarray]:
        """Return (positive entries buffered, threshold or None, sorted core indices).

        Raises:
            CutTooHighError: Started from a cut that fewer than k entries reach.
        """
        values, indices = self.values[: self.size], self.indices[: self.size]
        if self.size < self.k and self.initial_cut > 0:
            raise CutTooHighError(self.initial_cut)
        if self.size < self.k:
            return self.size, None, np.empty(0, dtype=np.int64)
        threshold = kth_largest(values, self.k)
        core = indices[values >= threshold].numpy()
        self.values = self.indices = torch.empty(0)
        if core.size > 1 and not (core[1:] > core[:-1]).all():
            core = np.sort(core)
        return values.numel(), threshold, core


class CutTooHighError(Exception):
    """A starting cut turned out above the k-th largest Δ: select again from 0."""


def _sorted_intersection_size(a: np.ndarray, b: np.ndarray) -> int:
    if a.size == 0 or b.size == 0:
        return 0
    if a.size < b.size:
        a, b = b, a
    pos = np.searchsorted(a, b)
    pos[pos == a.size] = a.size - 1
    return int(np.count_nonzero(a[pos] == b))


def select_cores_buffer(
    chunks: Iterable[DeltaChunk],
    *,
    k: int,
    tensor_offsets: Sequence[int],
    labels: Sequence[str],
    total: int,
    cuts: Sequence[float] | None = None,
) -> CoreSelection:
    """Exact cores in one pass with a pruned running top-k buffer per task.

    Args:
        chunks: The Δ stream, with chunk offsets increasing along the stream.
        k: Entries per core before ties, ``floor(p · D)``; ``1 <= k <= total``.
        tensor_offsets: Global flat offset of each tensor's first entry, ascending.
        labels: One name per task, used in error messages.
        total: D, the number of entries in the stream.
        cuts: Optional starting cut per task (see
            :func:`cpi_merge.starting_cut.estimate_cuts`): entries below
            it are never buffered. Exactness does not depend on it.

    Returns:
        The exact :class:`CoreSelection`.

    Raises:
        DegenerateTaskError: A task has fewer than k entries that differ from the base.
        CutTooHighError: A starting cut was reached by fewer than k entries; run again
            without ``cuts``.

    """
    buffers = [_TopKBuffer(k, cut) for cut in (cuts or [0.0] * len(labels))]
    for chunk in chunks:
        for buffer, delta in zip(buffers, chunk.deltas, strict=True):
            buffer.add(delta, chunk.offset)

    starts = np.asarray(tensor_offsets, dtype=np.int64)
    edges = np.append(starts, total)
    thresholds, cores = [], []
    counts = np.zeros((len(labels), len(starts)), dtype=np.int64)
    for i, (buffer, label) in enumerate(zip(buffers, labels, strict=True)):
        positive, threshold, core = buffer.finish()
        if threshold is None:
            raise _degenerate(label, positive, k, total)
        thresholds.append(threshold)
        cores.append(core)
        counts[i] = np.diff(np.searchsorted(core, edges))  # core is sorted

    n = len(labels)
    intersections = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        intersections[i, i] = cores[i].size
        for j in range(i + 1, n):
            intersections[i, j] = intersections[j, i] = _sorted_intersection_size(
                cores[i], cores[j]
            )
    return CoreSelection(tuple(thresholds), counts, intersections, tuple(cores))


def select_cores_histogram(
    open_stream: Callable[[], Iterable[DeltaChunk]],
    *,
    k: int,
    n_tensors: int,
    labels: Sequence[str],
    total: int,
) -> CoreSelection:
    """Exact cores in three passes of constant memory (radix select on float32 bits).

    Args:
        open_stream: Returns a fresh Δ stream each time it is called (three times).
        k: Entries per core before ties, ``floor(p · D)``; ``1 <= k <= total``.
        n_tensors: Number of tensors in the stream.
        labels: One name per task, used in error messages.
        total: D, the number of entries in the stream.

    Returns:
        The exact :class:`CoreSelection`.

    Raises:
        DegenerateTaskError: A task has fewer than k entries that differ from the base.

    """
    n = len(labels)
    high = [torch.zeros(_HIGH_BUCKETS, dtype=torch.int64) for _ in range(n)]
    positive = [0] * n
    for chunk in open_stream():
        for i, delta in enumerate(chunk.deltas):
            high[i] += torch.bincount(_high_keys(delta), minlength=_HIGH_BUCKETS)
            positive[i] += int(torch.count_nonzero(delta))
    for i in range(n):
        if positive[i] < k:
            raise _degenerate(labels[i], positive[i], k, total)

    buckets, ranks = [], []
    for i in range(n):
        bucket, above = _top_bucket(high[i], k)
        buckets.append(bucket)
        ranks.append(k - above)  # rank of the k-th largest inside its bucket
    del high

    low = [torch.zeros(_LOW_BUCKETS, dtype=torch.int64) for _ in range(n)]
    for chunk in open_stream():
        for i, delta in enumerate(chunk.deltas):
            inside = delta.view(torch.int32)[_high_keys(delta) == buckets[i]] & (_LOW_BUCKETS - 1)
            if inside.numel():
                low[i] += torch.bincount(inside, minlength=_LOW_BUCKETS)
    thresholds = []
    for i in range(n):
        low_bits, _ = _top_bucket(low[i], ranks[i])
        thresholds.append(float32_from_bits((buckets[i] << _LOW_BITS) | low_bits))

    counts, intersections = count_cores(open_stream(), thresholds, n_tensors=n_tensors)
    return CoreSelection(tuple(thresholds), counts, intersections)


def count_cores(
    chunks: Iterable[DeltaChunk], thresholds: Sequence[float], *, n_tensors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Count core entries per tensor and pairwise core intersections for known thresholds.

    Args:
        chunks: The Δ stream.
        thresholds: ``t_i`` per task; entry j is in core i when ``Δi[j] >= t_i``.
        n_tensors: Number of tensors in the stream.

    Returns:
        ``(counts, intersections)`` as in :class:`CoreSelection`.

    """
    n = len(thresholds)
    counts = np.zeros((n, n_tensors), dtype=np.int64)
    intersections = np.zeros((n, n), dtype=np.int64)
    for chunk in chunks:
        masks = [d >= t for d, t in zip(chunk.deltas, thresholds, strict=True)]
        for i in range(n):
            c = int(torch.count_nonzero(masks[i]))
            counts[i, chunk.tensor_index] += c
            intersections[i, i] += c
            for j in range(i + 1, n):
                both = int(torch.count_nonzero(masks[i] & masks[j]))
                intersections[i, j] += both
                intersections[j, i] += both
    return counts, intersections
