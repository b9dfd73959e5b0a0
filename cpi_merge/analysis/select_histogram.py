"""The ``histogram`` strategy: exact cores in two passes (usually) of bounded memory.

A radix select on each entry's whole key (:mod:`cpi_merge.analysis.core_rule`): Δ's
float32 bits, then |θ0|'s (reversed: smaller first), then the tie hash (reversed). Pass
1 counts the upper 16 bits of Δ, which finds each core's *boundary bucket*: the entries
whose key starts like the core's last entry's. When the buckets' entries fit in
``memory_budget`` (the usual case), pass 2 keeps them and counts everything above them
(core sizes per tensor, pairwise overlaps); the boundaries are then resolved in memory.
When they do not fit (millions of bf16 ties at one value of a 70B model), each further
pass narrows the buckets by the next digits of the key until they do. Memory: a few MB
of histograms per task plus at most the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cpi_merge.analysis.boundary import TensorLayout, resolve_boundary
from cpi_merge.analysis.core_rule import MAX_HASH, CoreBoundary
from cpi_merge.analysis.radix import float32_from_bits, top_bucket
from cpi_merge.analysis.selection import (
    CoreSelection,
    DeltaChunk,
    degenerate_task,
    sorted_intersection_size,
)

LOG = logging.getLogger(__name__)
KEPT_BYTES = 4 + 4 + 8 + 8
"""Bytes per kept bucket entry: Δ, |θ0|, global index, which other tasks have it above."""
MAX_TASKS = 63
_WIDTHS = (31, 31, 53)  # key levels: Δ bits, reversed |θ0| bits, reversed hash
_STEPS = ((0, 16), (0, 15), (1, 16), (1, 15), (2, 18), (2, 18), (2, 17))


@dataclass
class _Bucket:
    """One task's boundary bucket: key levels fixed so far, the current level's prefix."""

    rank: int
    """1-based rank of the core's last entry inside the bucket."""
    levels: int
    """Key levels that may be narrowed (1 when every tie is taken: Δ only)."""
    fixed: list[int] = field(default_factory=list)
    prefix: int = 0
    bits: int = 0
    population: int = 0
    above: int = 0
    """Entries strictly better than the bucket."""
    above_threshold: int | None = None
    at_threshold: int | None = None
    """Entries with Δ > t and Δ == t, known once Δ's level is fixed."""

    def next_step(self) -> tuple[int, int] | None:
        done = sum(_WIDTHS[: len(self.fixed)]) + self.bits
        for level, width in _STEPS:
            if level >= self.levels:
                return None
            if done < width:
                return level, width
            done -= width
        return None


def _key(level: int, chunk: DeltaChunk, task: int, at: torch.Tensor, layout) -> torch.Tensor:
    """Level ``level`` of the key (larger = better) of entries ``at`` of a chunk, int64."""
    if level == 0:
        return chunk.deltas[task][at].view(torch.int32).long()
    if level == 1:
        return 0x7FFFFFFF - chunk.base[at].abs().view(torch.int32).long()
    hashes = layout.layout.hashes(layout.seed, (at + chunk.offset).numpy())
    return torch.from_numpy((np.uint64(MAX_HASH) - hashes).astype(np.int64))


@dataclass(frozen=True)
class _Keyed:
    layout: TensorLayout
    seed: int


def _classify(
    chunk: DeltaChunk, task: int, bucket: _Bucket, keyed: _Keyed
) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool mask of the chunk's entries strictly above the bucket; positions inside it."""
    bits = chunk.deltas[task].view(torch.int32)
    if not bucket.fixed:  # Δ's level, partly resolved
        top = bits >> (_WIDTHS[0] - bucket.bits)
        return top > bucket.prefix, (top == bucket.prefix).nonzero().squeeze(1)
    above = bits > bucket.fixed[0]
    at = (bits == bucket.fixed[0]).nonzero().squeeze(1)
    for level, value in enumerate(bucket.fixed[1:], 1):
        key = _key(level, chunk, task, at, keyed)
        above[at[key > value]] = True
        at = at[key == value]
    if bucket.bits:
        level = len(bucket.fixed)
        top = _key(level, chunk, task, at, keyed) >> (_WIDTHS[level] - bucket.bits)
        above[at[top > bucket.prefix]] = True
        at = at[top == bucket.prefix]
    return above, at


def _narrow(chunks, buckets: list[_Bucket], keyed: _Keyed, labels, k, total) -> None:
    """One pass: histogram the next digit inside every bucket, then narrow the buckets."""
    steps = [b.next_step() for b in buckets]
    hists = [None if s is None else torch.zeros(1 << s[1], dtype=torch.int64) for s in steps]
    zeros = [0] * len(buckets)
    for chunk in chunks:
        for i, (bucket, step) in enumerate(zip(buckets, steps, strict=True)):
            if step is None:
                continue
            level, width = step
            if bucket.fixed or bucket.bits:
                inside = _classify(chunk, i, bucket, keyed)[1]
                key = _key(level, chunk, i, inside, keyed)
                shift = _WIDTHS[level] - bucket.bits - width
                key = (key >> shift) & ((1 << width) - 1)
            else:  # the first digit: every entry's top bits (Δ = 0 removed below)
                key = chunk.deltas[i].view(torch.int32)
                zeros[i] += key.numel() - int(torch.count_nonzero(key))
                key = key >> (_WIDTHS[level] - width)
            hists[i] += torch.bincount(key, minlength=1 << width)
    for i, (bucket, hist, step) in enumerate(zip(buckets, hists, steps, strict=True)):
        if step is None:
            continue
        if not (bucket.fixed or bucket.bits):
            hist[0] -= zeros[i]  # Δ = 0 never enters a core
            if int(hist.sum()) < k:
                raise degenerate_task(labels[i], int(hist.sum()), k, total)
        level, width = step
        digit, above = top_bucket(hist, bucket.rank)
        bucket.above += above
        bucket.rank -= above
        bucket.population = int(hist[digit])
        bucket.prefix = (bucket.prefix << width) | digit
        bucket.bits += width
        if bucket.bits == _WIDTHS[level]:
            bucket.fixed.append(bucket.prefix)
            bucket.prefix = bucket.bits = 0
            if level == 0:
                bucket.above_threshold, bucket.at_threshold = bucket.above, bucket.population


def select_cores_histogram(
    open_stream: Callable[[str], Iterable[DeltaChunk]],
    *,
    k: int,
    layout: TensorLayout,
    labels: Sequence[str],
    total: int,
    memory_budget: int,
    exact_k: bool = True,
    seed: int = 0,
) -> CoreSelection:
    """Exact cores by radix selection on the whole key, keeping at most ``memory_budget``.

    Args:
        open_stream: Returns a fresh Δ stream (with θ0) each time it is called; its
            argument labels the pass for the progress bar.
        k: Entries per core, ``floor(p · D)``; ``1 <= k <= total``.
        layout: Tensor names and global offsets.
        labels: One name per task, used in error messages.
        total: D, the number of entries in the stream.
        memory_budget: Bytes the kept bucket entries of all tasks may take.
        exact_k: Exactly k entries by the tie rule (else every entry at the threshold).
        seed: Seed of the tie hash.

    Returns:
        The exact :class:`CoreSelection` (no positions).

    Raises:
        DegenerateTaskError: A task has fewer than k entries that differ from the base.
        ValueError: More than 63 tasks.
    """
    n = len(labels)
    if n > MAX_TASKS:
        raise ValueError(f"the histogram strategy handles at most {MAX_TASKS} tasks; got {n}")
    keyed = _Keyed(layout, seed)
    buckets = [_Bucket(rank=k, levels=3 if exact_k else 1) for _ in range(n)]
    passes = 0
    while any(b.next_step() is not None for b in buckets):
        passes += 1
        _narrow(open_stream(f"pass {passes}: key histogram"), buckets, keyed, labels, k, total)
        if sum(b.population for b in buckets) * KEPT_BYTES <= memory_budget:
            break
    passes += 1
    LOG.info("histogram strategy: %d passes over the checkpoints", passes)
    final = open_stream(f"pass {passes}: cores and overlaps")
    if all(b.next_step() is None for b in buckets) and not exact_k:
        return _count_every_tie(final, buckets, n, len(layout.offsets), seed)
    return _keep_and_resolve(final, buckets, keyed, n, exact_k)


def _count_every_tie(chunks, buckets, n: int, n_tensors: int, seed: int) -> CoreSelection:
    """Final pass when every tie is taken and every threshold is known: just count."""
    thresholds = [float32_from_bits(b.fixed[0]) for b in buckets]
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
    ties = tuple(b.at_threshold for b in buckets)
    return CoreSelection(
        boundaries=tuple(CoreBoundary(t, seed=seed) for t in thresholds),
        counts=counts,
        intersections=intersections,
        at_threshold=ties,
        taken_at_threshold=ties,
    )


def _keep_and_resolve(chunks, buckets, keyed: _Keyed, n: int, exact_k: bool) -> CoreSelection:
    """Final pass: count what is above each bucket, keep what is inside, resolve in memory."""
    layout = keyed.layout
    n_tensors = len(layout.offsets)
    counts = np.zeros((n, n_tensors), dtype=np.int64)
    both_above = np.zeros((n, n), dtype=np.int64)
    kept: list[list[tuple]] = [[] for _ in range(n)]
    for chunk in chunks:
        above_masks, insides = [], []
        for i, bucket in enumerate(buckets):
            above, inside = _classify(chunk, i, bucket, keyed)
            above_masks.append(above)
            insides.append(inside)
            c = int(torch.count_nonzero(above))
            counts[i, chunk.tensor_index] += c
            both_above[i, i] += c
        for i in range(n):
            for j in range(i + 1, n):
                both = int(torch.count_nonzero(above_masks[i] & above_masks[j]))
                both_above[i, j] += both
                both_above[j, i] += both
        for i, inside in enumerate(insides):
            if inside.numel():
                others = torch.zeros(inside.numel(), dtype=torch.int64)
                for j in range(n):
                    if j != i:
                        others |= above_masks[j][inside].long() << j
                kept[i].append(
                    (
                        chunk.deltas[i][inside].clone(),
                        chunk.base[inside].abs(),
                        inside + chunk.offset,
                        others,
                    )
                )
    starts = np.asarray(layout.offsets, dtype=np.int64)
    boundaries, ties, taken, selected = [], [], [], []
    for i, bucket in enumerate(buckets):
        delta, base_abs, index, others = (torch.cat(parts) for parts in zip(*kept[i], strict=True))
        found = resolve_boundary(
            delta, base_abs, index, bucket.rank, layout=layout, exact_k=exact_k, seed=keyed.seed
        )
        core = index[found.selected].numpy()
        order = np.argsort(core)
        selected.append((core[order], others[found.selected].numpy()[order]))
        counts[i] += np.bincount(
            np.searchsorted(starts, core, side="right") - 1, minlength=n_tensors
        )
        boundaries.append(found.boundary)
        if bucket.at_threshold is None:  # the bucket held every entry at the threshold
            ties.append(found.at_threshold)
            taken.append(found.taken_at_threshold)
        else:
            ties.append(bucket.at_threshold)
            taken.append(int(counts[i].sum()) - bucket.above_threshold)
    intersections = both_above.copy()
    for i in range(n):
        intersections[i, i] += selected[i][0].size
        for j in range(n):
            if j != i:  # S_i ∩ A_j, and S_i ∩ S_j once per pair
                intersections[i, j] += int(np.count_nonzero((selected[i][1] >> j) & 1))
                intersections[j, i] += int(np.count_nonzero((selected[i][1] >> j) & 1))
        for j in range(i + 1, n):
            same = sorted_intersection_size(selected[i][0], selected[j][0])
            intersections[i, j] += same
            intersections[j, i] += same
    return CoreSelection(
        boundaries=tuple(boundaries),
        counts=counts,
        intersections=intersections,
        at_threshold=tuple(ties),
        taken_at_threshold=tuple(taken),
    )
