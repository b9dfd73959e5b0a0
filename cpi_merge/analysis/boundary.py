"""Finding a core's boundary among candidate entries held in memory (both strategies).

Given candidates (Δ, |θ0|, global position) that contain the core's boundary, and the
rank of the core's last entry among them, the boundary is the key of that entry
(:mod:`cpi_merge.analysis.core_rule`): the threshold by a radix select on Δ, then, among
the entries tied at it, the smallest-|θ0| ones, then the smallest hashes. No full sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpi_merge.analysis.core_rule import CoreBoundary, tie_hash
from cpi_merge.analysis.radix import kth_largest


@dataclass(frozen=True)
class TensorLayout:
    """Where each tensor's entries sit in the global flat order (tensors end to end)."""

    names: Sequence[str]
    offsets: Sequence[int]

    def hashes(self, seed: int, positions: np.ndarray) -> np.ndarray:
        """:func:`tie_hash` of global positions (each hashed within its own tensor)."""
        starts = np.asarray(self.offsets, dtype=np.int64)
        which = np.searchsorted(starts, positions, side="right") - 1
        out = np.empty(positions.size, dtype=np.uint64)
        for t in np.unique(which):
            at = which == t
            out[at] = tie_hash(seed, self.names[t], positions[at] - starts[t])
        return out


@dataclass(frozen=True)
class Resolved:
    """The boundary of one core, and which candidates it selects."""

    boundary: CoreBoundary
    selected: torch.Tensor
    """Bool mask over the candidates: the ones in the core."""
    at_threshold: int
    """Candidates with Δ == t (all entries at the threshold, when the candidates hold them)."""
    taken_at_threshold: int
    """How many of those are in the core."""


def resolve_boundary(
    delta: torch.Tensor,
    base_abs: torch.Tensor,
    positions: torch.Tensor,
    rank: int,
    *,
    layout: TensorLayout,
    exact_k: bool,
    seed: int,
) -> Resolved:
    """The boundary of the core whose last entry has ``rank`` among the candidates.

    Args:
        delta: Candidates' Δ (float32, finite, non-negative).
        base_abs: Their |θ0| (float32).
        positions: Their global flat positions (int64).
        rank: 1-based rank of the core's last entry among the candidates, best first.
        layout: Tensor names and offsets, for the hashes.
        exact_k: False: every entry at the threshold is in the core.
        seed: Seed of the tie hash.

    Returns:
        The boundary and the selected candidates.
    """
    t = kth_largest(delta, rank)
    above = delta > t
    tied = (delta == t).nonzero().squeeze(1)
    rank_in_tie = rank - int(above.sum())
    if not exact_k:
        selected = above
        selected[tied] = True
        return Resolved(CoreBoundary(t, seed=seed), selected, tied.numel(), tied.numel())
    b = base_abs[tied]
    a = kth_largest(b, b.numel() - rank_in_tie + 1)  # the rank_in_tie-th smallest |θ0|
    smaller = b < a
    level = tied[b == a]
    hashes = layout.hashes(seed, positions[level].numpy())
    pick = rank_in_tie - int(smaller.sum())
    h = int(np.partition(hashes, pick - 1)[pick - 1])
    selected = above
    selected[tied[smaller]] = True
    selected[level[torch.from_numpy(hashes <= np.uint64(h))]] = True
    taken = int(selected[tied].sum())
    return Resolved(CoreBoundary(t, a, h, seed=seed), selected, tied.numel(), taken)
