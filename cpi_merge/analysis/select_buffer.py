"""The ``buffer`` strategy: exact global top-k cores in one pass.

Per task, a running buffer keeps (Δ, |θ0|, global index) of every entry at or above a
running lower bound of the k-th Δ and is pruned when it reaches 2k entries. At the end
the core's boundary is resolved among the buffered entries (:mod:`.boundary`). Fast;
memory about 48 bytes per core entry per task at the peak. It ends holding every core
position, which the merge method can then use instead of finding them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpi_merge.analysis.boundary import Resolved, TensorLayout, resolve_boundary
from cpi_merge.analysis.fixed_order import sum_of_squares
from cpi_merge.analysis.positions import positions_at_least
from cpi_merge.analysis.radix import HIGH_BUCKETS, bucket_floor, high_keys, top_bucket
from cpi_merge.analysis.selection import (
    CoreSelection,
    DeltaChunk,
    degenerate_task,
    sorted_intersection,
)

# Peak bytes per core entry and task: a (float32 Δ, float32 |θ0|, int64 index, bool sign)
# buffer of 2k entries, plus the k kept entries gathered while pruning.
BUFFER_BYTES_PER_CORE_ENTRY = 3 * (4 + 4 + 8 + 1)


class CutTooHighError(Exception):
    """A starting cut turned out above the k-th largest Δ: select again from 0."""


@dataclass(frozen=True)
class _Core:
    resolved: Resolved
    positions: np.ndarray
    negative: np.ndarray
    energy: float


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
        self.negative = torch.empty(0, dtype=torch.bool)
        self.size = 0
        self.prune_at = 2 * k

    def _reserve(self, extra: int) -> None:
        need = self.size + extra
        if need <= self.values.numel():
            return
        capacity = max(need, self.prune_at + extra)
        grown = []
        for old in self._buffers():
            new = torch.empty(capacity, dtype=old.dtype)
            new[: self.size] = old[: self.size]
            grown.append(new)
        self.values, self.base_abs, self.indices, self.negative = grown

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.values, self.base_abs, self.indices, self.negative

    def add(self, chunk: DeltaChunk, task: int):
        delta, base, offset = chunk.deltas[task], chunk.base, chunk.offset
        local = positions_at_least(delta, self.cut)  # every Δ > 0 while the cut is 0
        n = local.numel()
        if n == 0:
            return
        self._reserve(n)
        end = self.size + n
        torch.index_select(delta, 0, local, out=self.values[self.size : end])
        torch.index_select(base, 0, local, out=self.base_abs[self.size : end]).abs_()
        self.negative[self.size : end] = chunk.negative(task, local)
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
            for buf in self._buffers():
                buf[:m] = buf[: self.size].index_select(0, keep)
            self.size = m
            self.cut = max(self.cut, bucket_floor(bucket))
        # Heavy ties at the cut can keep the buffer above 2k: grow the limit, don't thrash.
        self.prune_at = max(2 * self.k, 2 * self.size)

    def finish(self, layout: TensorLayout, exact_k: bool, seed: int) -> _Core | None:
        """The core: resolved boundary, sorted positions, their signs and its energy.

        Returns:
            None when fewer than k entries differ from the base (``positive`` tells).

        Raises:
            CutTooHighError: Started from a cut that fewer than k entries reach.
        """
        n = self.size
        if n < self.k and self.initial_cut > 0:
            raise CutTooHighError(self.initial_cut)
        if n < self.k:
            return None
        values, indices = self.values[:n], self.indices[:n]
        resolved = resolve_boundary(
            values, self.base_abs[:n], indices, self.k, layout=layout, exact_k=exact_k, seed=seed
        )
        picked = resolved.selected
        core, negative = indices[picked].numpy(), self.negative[:n][picked].numpy()
        energy = sum_of_squares(values[picked])
        self.values = self.base_abs = self.indices = self.negative = torch.empty(0)
        if core.size > 1 and not (core[1:] > core[:-1]).all():
            order = np.argsort(core)
            core, negative = core[order], negative[order]
        return _Core(resolved, core, negative, energy)


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
        for task, buffer in enumerate(buffers):
            buffer.add(chunk, task)

    edges = np.append(np.asarray(layout.offsets, dtype=np.int64), total)
    cores: list[_Core] = []
    counts = np.zeros((len(labels), len(layout.offsets)), dtype=np.int64)
    for i, (buffer, label) in enumerate(zip(buffers, labels, strict=True)):
        positive = buffer.size
        core = buffer.finish(layout, exact_k, seed)
        if core is None:
            raise degenerate_task(label, positive, k, total)
        cores.append(core)
        counts[i] = np.diff(np.searchsorted(core.positions, edges))  # positions are sorted

    n = len(labels)
    intersections = np.zeros((n, n), dtype=np.int64)
    conflicts = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        intersections[i, i] = cores[i].positions.size
        for j in range(i + 1, n):
            at_i, at_j = sorted_intersection(cores[i].positions, cores[j].positions)
            intersections[i, j] = intersections[j, i] = at_i.size
            opposite = cores[i].negative[at_i] != cores[j].negative[at_j]
            conflicts[i, j] = conflicts[j, i] = int(np.count_nonzero(opposite))
    return CoreSelection(
        boundaries=tuple(c.resolved.boundary for c in cores),
        counts=counts,
        intersections=intersections,
        at_threshold=tuple(c.resolved.at_threshold for c in cores),
        taken_at_threshold=tuple(c.resolved.taken_at_threshold for c in cores),
        core_energy=tuple(c.energy for c in cores),
        sign_conflicts=conflicts,
        positions=tuple(c.positions for c in cores),
    )
