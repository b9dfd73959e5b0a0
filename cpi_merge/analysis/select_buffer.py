"""The ``buffer`` strategy: exact global top-k cores in one pass.

Per task, a running buffer keeps (Δ, |θ0|, global index) of every entry at or above a
running lower bound of the k-th Δ and is pruned when it reaches 2k entries. At the end
the core's boundary is resolved among the buffered entries (:mod:`.boundary`). Fast;
memory about 48 bytes per core entry per task at the peak. It ends holding every core
position, which the merge method can then use instead of finding them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from cpi_merge.analysis.boundary import Resolved, TensorLayout, resolve_boundary
from cpi_merge.analysis.radix import HIGH_BUCKETS, bucket_floor, high_keys, top_bucket
from cpi_merge.analysis.selection import (
    CoreSelection,
    DeltaChunk,
    degenerate_task,
    sorted_intersection_size,
)

# Peak bytes per core entry and task: a (float32 Δ, float32 |θ0|, int64 index) buffer of
# 2k entries, plus the k kept entries gathered while pruning.
BUFFER_BYTES_PER_CORE_ENTRY = 3 * (4 + 4 + 8)


class CutTooHighError(Exception):
    """A starting cut turned out above the k-th largest Δ: select again from 0."""


class _TopKBuffer:
    """Running exact top-k of one task's Δ stream, keeping |θ0| and global indices.

    Candidates are appended into one preallocated buffer and compacted in place when it
    reaches 2k entries, so a prune allocates only the kept entries.
    """

    def __init__(self, k: int, cut: float = 0.0):
        self.k = k
        self.cut = cut  # every entry >= cut (and > 0) seen so far is in the buffer
        self.initial_cut = cut
        self.values = torch.empty(0, dtype=torch.float32)
        self.base_abs = torch.empty(0, dtype=torch.float32)
        self.indices = torch.empty(0, dtype=torch.int64)
        self.size = 0
        self.prune_at = 2 * k

    def _reserve(self, extra: int) -> None:
        need = self.size + extra
        if need <= self.values.numel():
            return
        capacity = max(need, self.prune_at + extra)
        grown = []
        for old in (self.values, self.base_abs, self.indices):
            new = torch.empty(capacity, dtype=old.dtype)
            new[: self.size] = old[: self.size]
            grown.append(new)
        self.values, self.base_abs, self.indices = grown

    def add(self, delta: torch.Tensor, base: torch.Tensor, offset: int) -> None:
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
        torch.index_select(base, 0, local, out=self.base_abs[self.size : end]).abs_()
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
            for buf in (self.values, self.base_abs, self.indices):
                buf[:m] = buf[: self.size].index_select(0, keep)
            self.size = m
            self.cut = max(self.cut, bucket_floor(bucket))
        # Heavy ties at the cut can keep the buffer above 2k: grow the limit, don't thrash.
        self.prune_at = max(2 * self.k, 2 * self.size)

    def finish(
        self, layout: TensorLayout, exact_k: bool, seed: int
    ) -> tuple[int, Resolved | None, np.ndarray]:
        """Return (positive entries buffered, the resolved boundary or None, sorted core).

        Raises:
            CutTooHighError: Started from a cut that fewer than k entries reach.
        """
        n = self.size
        if n < self.k and self.initial_cut > 0:
            raise CutTooHighError(self.initial_cut)
        if n < self.k:
            return n, None, np.empty(0, dtype=np.int64)
        values, indices = self.values[:n], self.indices[:n]
        resolved = resolve_boundary(
            values, self.base_abs[:n], indices, self.k, layout=layout, exact_k=exact_k, seed=seed
        )
        core = indices[resolved.selected].numpy()
        self.values = self.base_abs = self.indices = torch.empty(0)
        if core.size > 1 and not (core[1:] > core[:-1]).all():
            core = np.sort(core)
        return n, resolved, core


def select_cores_buffer(
    chunks: Iterable[DeltaChunk],
    *,
    k: int,
    layout: TensorLayout,
    labels: Sequence[str],
    total: int,
    exact_k: bool = True,
    seed: int = 0,
    cuts: Sequence[float] | None = None,
) -> CoreSelection:
    """Exact cores in one pass with a pruned running top-k buffer per task.

    Args:
        chunks: The Δ stream (with θ0), with chunk offsets increasing along the stream.
        k: Entries per core, ``floor(p · D)``; ``1 <= k <= total``.
        layout: Tensor names and global offsets (ascending).
        labels: One name per task, used in error messages.
        total: D, the number of entries in the stream.
        exact_k: Exactly k entries by the tie rule (else every entry at the threshold).
        seed: Seed of the tie hash.
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
            buffer.add(delta, chunk.base, chunk.offset)

    edges = np.append(np.asarray(layout.offsets, dtype=np.int64), total)
    resolved, cores = [], []
    counts = np.zeros((len(labels), len(layout.offsets)), dtype=np.int64)
    for i, (buffer, label) in enumerate(zip(buffers, labels, strict=True)):
        positive, found, core = buffer.finish(layout, exact_k, seed)
        if found is None:
            raise degenerate_task(label, positive, k, total)
        resolved.append(found)
        cores.append(core)
        counts[i] = np.diff(np.searchsorted(core, edges))  # core is sorted

    n = len(labels)
    intersections = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        intersections[i, i] = cores[i].size
        for j in range(i + 1, n):
            intersections[i, j] = intersections[j, i] = sorted_intersection_size(cores[i], cores[j])
    return CoreSelection(
        boundaries=tuple(r.boundary for r in resolved),
        counts=counts,
        intersections=intersections,
        at_threshold=tuple(r.at_threshold for r in resolved),
        taken_at_threshold=tuple(r.taken_at_threshold for r in resolved),
        positions=tuple(cores),
    )
