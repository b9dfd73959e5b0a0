"""What the first pass learns about the updates besides the cores (no extra read).

Per task, while the analysis streams ``θi − θ0``: ‖θi − θ0‖ and ‖θ0‖ (the update's
relative size) and, per pair of tasks, ``Σ (θi − θ0)(θj − θ0)`` (their cosine): a few
dot products per chunk. A non-finite sum reveals NaN/Inf at no extra cost. The dot
products run on one thread: BLAS splits a sum differently for each thread count, and the
plan should not depend on the machine (:mod:`cpi_merge.analysis.fixed_order`).

On request (``energy_curve``), also a histogram of ``|θi − θ0|`` by its upper 16 float32
bits with the count and the summed ``Δ²`` of every bucket: how the update's energy
spreads over entries, exactly at every bucket edge. It costs about twice the analysis
itself (a scatter-add per entry; benchmarks/RESULTS.md), hence off by default.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cpi_merge.analysis.fixed_order import one_thread

KEY_SHIFT = 16
BUCKETS = 1 << (31 - KEY_SHIFT)
"""Δ ≥ 0, so its float32 bits are at most 2^31: 32,768 buckets by the upper bits."""


class UpdateStats:
    """Per-task update statistics, accumulated chunk by chunk (first pass only).

    Args:
        n_tasks: Number of task models.
        energy_curve: Also keep the per-task energy histograms (see the module docstring).
    """

    def __init__(self, n_tasks: int, *, energy_curve: bool = False):
        self.base_sq = 0.0
        self.delta_sq = [0.0] * n_tasks
        """``‖θi − θ0‖²`` per task."""
        self.cross = np.zeros((n_tasks, n_tasks))
        self.counts: list[torch.Tensor] | None = None
        self.energy: list[torch.Tensor] | None = None
        if energy_curve:
            self.counts = [torch.zeros(BUCKETS, dtype=torch.int64) for _ in range(n_tasks)]
            self.energy = [torch.zeros(BUCKETS, dtype=torch.float64) for _ in range(n_tasks)]

    def add(self, base: torch.Tensor, signed: list[torch.Tensor]) -> bool:
        """Add one chunk's θ0 and ``θi − θ0`` per task (the dot products).

        Returns:
            False when an input holds NaN/Inf in this chunk (seen as a non-finite sum,
            then confirmed entry by entry: huge finite values may overflow a sum).
        """
        with one_thread():  # sums in one fixed order: the same on any machine
            base_sq = float(torch.dot(base, base))
            finite = math.isfinite(base_sq)
            self.base_sq += base_sq
            for i, s in enumerate(signed):
                sq = float(torch.dot(s, s))
                finite = finite and math.isfinite(sq)
                self.delta_sq[i] += sq
                for j in range(i + 1, len(signed)):
                    self.cross[i, j] += float(torch.dot(s, signed[j]))
        if not finite:
            return all(bool(torch.isfinite(x).all()) for x in (base, *signed))
        return True

    def add_magnitudes(self, deltas: tuple[torch.Tensor, ...]) -> None:
        """Add one chunk's |θi − θ0| to the energy histograms (when kept)."""
        if self.energy is None or self.counts is None:
            return
        for i, d in enumerate(deltas):
            counts, energy = magnitude_histogram(d)
            self.counts[i] += counts
            self.energy[i] += energy

    def relative_norms(self) -> list[float]:
        """‖θi − θ0‖ / ‖θ0‖ per task."""
        base = math.sqrt(self.base_sq)
        return [math.sqrt(d) / base if base > 0 else math.inf for d in self.delta_sq]

    def cosines(self) -> list[list[float]]:
        """cos(θi − θ0, θj − θ0) for every pair (1 on the diagonal)."""
        norms = [math.sqrt(d) for d in self.delta_sq]
        n = len(norms)
        out = [[1.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                den = norms[i] * norms[j]
                out[i][j] = out[j][i] = self.cross[i, j] / den if den > 0 else 0.0
        return out

    def energy_curve(self, task: int, total: int) -> list[tuple[float, float]] | None:
        """Exact points of the energy curve (see :func:`bucket_curve`); None if not kept."""
        if self.counts is None or self.energy is None:
            return None
        return bucket_curve(self.counts[task], self.energy[task], total)


def magnitude_histogram(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and summed ``Δ²`` of |Δ| (float32, ≥ 0) per bucket of its upper 16 bits."""
    keys = delta.view(torch.int32) >> KEY_SHIFT
    energy = torch.bincount(keys, weights=delta * delta, minlength=BUCKETS)
    return torch.bincount(keys, minlength=BUCKETS), energy


def bucket_curve(
    counts: torch.Tensor, energy: torch.Tensor, total: int
) -> list[tuple[float, float]]:
    """Points ``(share of entries, share of Δ² energy)`` of the largest-Δ entries.

    One point per non-empty bucket, from the largest Δ down: the entries with Δ in that
    bucket or above, and the share of ``Σ Δ²`` they hold (exact for those entries).
    """
    counts = torch.flip(counts, [0])
    held = torch.flip(energy, [0]).cumsum(0)
    whole = float(held[-1]) if len(held) else 0.0
    points = torch.stack([counts.cumsum(0).double() / max(total, 1), held / (whole or 1.0)], 1)
    return [(float(p), float(e)) for p, e in points[counts > 0]]
