"""The histogram strategy's last pass: count above the buckets, resolve inside them."""

from __future__ import annotations

import numpy as np
import torch

from cpi_merge.analysis.boundary import resolve_boundary
from cpi_merge.analysis.core_rule import CoreBoundary, core_mask
from cpi_merge.analysis.fixed_order import sum_of_squares
from cpi_merge.analysis.histogram_keys import Keyed, classify
from cpi_merge.analysis.radix import float32_from_bits
from cpi_merge.analysis.selection import CoreSelection, sorted_intersection

KEPT_BYTES = 4 + 4 + 8 + 8 + 8
"""Bytes per kept bucket entry: Δ, |θ0|, global index, and two task bitmasks (which tasks
have it above their bucket; which have a negative update there)."""


def count_every_tie(chunks, buckets, n: int, n_tensors: int, seed: int) -> CoreSelection:
    """Final pass when every tie is taken and every threshold is known: just count."""
    thresholds = [float32_from_bits(b.fixed[0]) for b in buckets]
    boundaries = tuple(CoreBoundary(t, seed=seed) for t in thresholds)  # every tie taken
    tally = _AboveTally(n, n_tensors)
    for chunk in chunks:
        tally.add(chunk, [core_mask(d, b) for d, b in zip(chunk.deltas, boundaries, strict=True)])
    ties = tuple(b.at_threshold for b in buckets)
    return CoreSelection(
        boundaries=boundaries,
        counts=tally.counts,
        intersections=np.triu(tally.overlaps) + np.triu(tally.overlaps, 1).T,
        at_threshold=ties,
        taken_at_threshold=ties,
        core_energy=tuple(tally.energy),
        sign_conflicts=tally.conflicts + tally.conflicts.T,
    )


def _bits(masks: list[torch.Tensor]) -> torch.Tensor:
    """Per entry, bit j set where ``masks[j]`` holds (one int64 for ≤ 63 tasks)."""
    bits = torch.zeros(masks[0].numel(), dtype=torch.int64)
    for j, mask in enumerate(masks):
        bits |= mask.long() << j
    return bits


class _AboveTally:
    """Per task, what a pass counts over the entries its mask marks (above a boundary).

    Entries per tensor, pairwise overlaps (upper triangle; the diagonal is the count),
    opposite signs in the overlaps (upper triangle), and Σ Δ² (float64).
    """

    def __init__(self, n: int, n_tensors: int):
        self.counts = np.zeros((n, n_tensors), dtype=np.int64)
        self.overlaps = np.zeros((n, n), dtype=np.int64)
        self.conflicts = np.zeros((n, n), dtype=np.int64)
        self.energy = [0.0] * n

    def add(self, chunk, masks: list[torch.Tensor]) -> None:
        """Count one chunk, ``masks[i]`` marking task i's entries."""
        n = len(masks)
        for i, d in enumerate(chunk.deltas):
            c = int(torch.count_nonzero(masks[i]))
            self.counts[i, chunk.tensor_index] += c
            self.overlaps[i, i] += c
            self.energy[i] += sum_of_squares(d[masks[i]])
            for j in range(i + 1, n):
                both = (masks[i] & masks[j]).nonzero().squeeze(1)
                self.overlaps[i, j] += both.numel()
                self.conflicts[i, j] += _opposite(chunk, i, j, both)


def _opposite(chunk, i: int, j: int, at: torch.Tensor) -> int:
    """How many of the positions ``at`` have updates of opposite signs in tasks i and j."""
    if at.numel() == 0:
        return 0
    return int(torch.count_nonzero(chunk.negative(i, at) ^ chunk.negative(j, at)))


def keep_and_resolve(chunks, buckets, keyed: Keyed, n: int, exact_k: bool) -> CoreSelection:
    """Final pass: count what is above each bucket, keep what is inside, resolve in memory.

    Above the buckets (A_i) the pass counts entries per tensor, pairwise overlaps, energy
    and opposite signs; inside them it keeps Δ, |θ0|, the position and which tasks have the
    entry above their bucket or a negative update there. The selected part of each bucket
    (S_i) then completes every figure: |Ci ∩ Cj| = |Ai ∩ Aj| + |Si ∩ Aj| + |Ai ∩ Sj| +
    |Si ∩ Sj|, and the same for opposite signs.
    """
    layout = keyed.layout
    n_tensors = len(layout.offsets)
    tally = _AboveTally(n, n_tensors)
    counts, overlaps, conflicts = tally.counts, tally.overlaps, tally.conflicts
    energy = tally.energy
    kept: list[list[tuple]] = [[] for _ in range(n)]
    for chunk in chunks:
        classified = [classify(chunk, i, bucket, keyed) for i, bucket in enumerate(buckets)]
        above = [c[0] for c in classified]
        tally.add(chunk, above)
        for i, d in enumerate(chunk.deltas):
            inside = classified[i][1]
            if inside.numel():
                negative = [chunk.negative(t, inside) for t in range(n)]
                kept[i].append(
                    (
                        d[inside].clone(),
                        chunk.base[inside].abs(),
                        inside + chunk.offset,
                        _bits([a[inside] for a in above]),
                        _bits(negative),
                    )
                )
    starts = np.asarray(layout.offsets, dtype=np.int64)
    boundaries, ties, taken, picked = [], [], [], []
    for i, bucket in enumerate(buckets):
        delta, base_abs, index, above_bits, negative_bits = (
            torch.cat(parts) for parts in zip(*kept[i], strict=True)
        )
        found = resolve_boundary(
            delta, base_abs, index, bucket.rank, layout=layout, exact_k=exact_k, seed=keyed.seed
        )
        chosen = found.selected
        energy[i] += sum_of_squares(delta[chosen])
        core = index[chosen].numpy()
        order = np.argsort(core)
        picked.append(
            (core[order], above_bits[chosen].numpy()[order], negative_bits[chosen].numpy()[order])
        )
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
    overlaps = np.triu(overlaps) + np.triu(overlaps, 1).T
    conflicts = conflicts + conflicts.T
    for i in range(n):
        positions, above_bits, negative_bits = picked[i]
        overlaps[i, i] += positions.size
        mine = (negative_bits >> i) & 1
        for j in range(n):
            if j == i:
                continue
            in_aj = ((above_bits >> j) & 1).astype(bool)  # S_i ∩ A_j
            opposite = in_aj & (mine != ((negative_bits >> j) & 1))
            for a, b in ((i, j), (j, i)):
                overlaps[a, b] += int(np.count_nonzero(in_aj))
                conflicts[a, b] += int(np.count_nonzero(opposite))
        for j in range(i + 1, n):  # S_i ∩ S_j
            at_i, at_j = sorted_intersection(positions, picked[j][0])
            opposite = ((negative_bits[at_i] >> i) & 1) != ((picked[j][2][at_j] >> j) & 1)
            for a, b in ((i, j), (j, i)):
                overlaps[a, b] += at_i.size
                conflicts[a, b] += int(np.count_nonzero(opposite))
    return CoreSelection(
        boundaries=tuple(boundaries),
        counts=counts,
        intersections=overlaps,
        at_threshold=tuple(ties),
        taken_at_threshold=tuple(taken),
        core_energy=tuple(energy),
        sign_conflicts=conflicts,
    )
