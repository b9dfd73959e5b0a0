"""The ``buffer`` strategy: exact global top-k cores in one pass (METHOD, Stage 1).

Per task, a running buffer keeps (value, global index) of every entry at or above a
running lower bound of the k-th value and is pruned when it reaches 2k entries. Fast;
memory about 36 bytes per core entry per task at the peak. It ends holding every core
position, which the merge method can then use instead of finding them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from cpi_merge.analysis.core_rule import core_mask
from cpi_merge.analysis.radix import HIGH_BUCKETS, bucket_floor, high_keys, kth_largest, top_bucket
from cpi_merge.analysis.selection import CoreSelection, DeltaChunk, degenerate_task

# Peak bytes per core entry and task: a (float32 value, int64 index) buffer of 2k entries,
# plus the k kept entries gathered while pruning.
BUFFER_BYTES_PER_CORE_ENTRY = 3 * (4 + 8)


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
            keys = high_keys(values)
            bucket, _ = top_bucket(torch.bincount(keys, minlength=HIGH_BUCKETS), self.k)
            keep = (keys >= bucket).nonzero().squeeze(1)
            del keys
            m = keep.numel()
            self.values[:m] = values.index_select(0, keep)
            self.indices[:m] = self.indices[: self.size].index_select(0, keep)
            self.size = m
            self.cut = max(self.cut, bucket_floor(bucket))
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
        core = indices[core_mask(values, threshold)].numpy()
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
            :func:`cpi_merge.analysis.starting_cut.estimate_cuts`): entries below
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
            raise degenerate_task(label, positive, k, total)
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
