"""Merge-ability diagnostics: is this the regime where merging and isolation can work.

All computed from the first pass and the exact selection (no extra read), every figure
exact like the thresholds:

* ``relative_update_norm`` ‖θi − θ0‖ / ‖θ0‖: merges work on small updates of a good base;
* ``core_energy_share`` Σ over the core of Δ² / Σ over all entries: how much of the
  update the top p holds (isolation can only matter if this is large);
* ``energy_curve``: the same for other fractions, the nearest at or above 0.1%, 0.5%,
  1%, 2%, 5%, 10%, 20%, 50% of the entries. By default it is *estimated* from the
  sample of Δ the analysis reads anyway (4M entries spread over the model; exact when
  the model has no more entries); with ``energy_curve=True`` it is exact, at the cost of
  a histogram per task over every entry (about twice the analysis). Points fall at
  edges of buckets of Δ (its upper 16 float32 bits);
* ``p_holding``: from the same curve, the smallest fraction of entries holding half
  (0.5) and 90% (0.9) of the energy;
* ``task_cosine`` cos(θi − θ0, θj − θ0) for every pair, and ``sign_conflict_rate``: the
  share of ``Ci ∩ Cj`` where the two updates have opposite signs.

The verdict's thresholds come from measurements, quoted in each reason (see
:data:`EVIDENCE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cpi_merge.analysis.selection import CoreSelection
from cpi_merge.analysis.update_stats import UpdateStats, bucket_curve, magnitude_histogram

CURVE_FRACTIONS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
HELD_SHARES = (0.5, 0.9)
EVIDENCE = {
    "far": 0.02,
    "close": 0.005,
    "low_energy": 0.25,
    "high_energy": 0.5,
    "conflict": 0.6,
}
"""Where the verdict's lines are drawn, and why (measured; benchmarks/RESULTS.md). Two
settings only so far: read the lines as rough guides, not laws.

* ``far``: the toy quality benchmark's probes moved 2.6-4.7% of the base's norm, and task
  arithmetic on them beat the base by 2.6 points only (merges barely worked);
* ``close``: the SmolLM2 community-style fine-tunes of the real-model tier moved
  0.05-0.32%, and their merge stayed a working language model (within the real tier's
  1.5x perplexity bound);
* ``low_energy``: the toy probes' top 1% held 11-21% of their update energy, and freezing
  it did not reduce forgetting (-7.7 vs -8.0 points); the SmolLM2 quality benchmark's
  cores held 6-7%, and CPI-FT with them frozen scored 54.3 against 54.7 with nothing
  frozen (one seed);
* ``high_energy``: above half, the core is most of the update (no measurement yet says
  that isolation then helps: the line only says there is something to protect);
* ``conflict``: updates with independent signs would disagree on half of their shared
  core entries; the measured pairs disagreed on 28-49% (real tier) and 31-65% (toy
  probes). Above 60% the two tasks pull the same weights apart more often than not.
"""


@dataclass(frozen=True)
class TaskDiagnostics:
    """One task's figures (see the module docstring)."""

    relative_update_norm: float
    core_energy_share: float
    energy_curve: list[tuple[float, float]] | None
    p_holding: dict[str, float] | None


def task_diagnostics(
    stats: UpdateStats,
    selection: CoreSelection,
    total: int,
    samples: Sequence[torch.Tensor] | None = None,
) -> list[TaskDiagnostics]:
    """Per task, in recipe order.

    Args:
        stats: The first pass's statistics (exact curves when it kept histograms).
        selection: The exact selection.
        total: Entries analysed.
        samples: Per task, |Δ| at sampled positions: the curve's estimate when ``stats``
            has no histograms (None: no curve).
    """
    out = []
    norms = stats.relative_norms()
    for i, energy in enumerate(stats.delta_sq):
        points = stats.energy_curve(i, total)
        if points is not None:
            curve, holding = _curve_points(points)
        elif samples is not None:
            curve, holding = sampled_curve(samples[i])
        else:
            curve, holding = None, None
        out.append(
            TaskDiagnostics(
                relative_update_norm=norms[i],
                core_energy_share=selection.core_energy[i] / energy if energy > 0 else 0.0,
                energy_curve=curve,
                p_holding=holding,
            )
        )
    return out


def _curve_points(
    points: list[tuple[float, float]],
) -> tuple[list[tuple[float, float]], dict[str, float]]:
    curve: list[tuple[float, float]] = []
    for fraction in CURVE_FRACTIONS:
        point = next((pt for pt in points if pt[0] >= fraction), None)
        if point is not None and point not in curve:
            curve.append(point)
    holding = {}
    for share in HELD_SHARES:
        point = next((pt for pt in points if pt[1] >= share), None)
        if point is not None:
            holding[f"{share:g}"] = point[0]
    return curve, holding


def sampled_curve(
    sample: torch.Tensor,
) -> tuple[list[tuple[float, float]], dict[str, float]]:
    """The curve and ``p_holding`` of a sample of |Δ|, as the exact ones are of every entry.

    Args:
        sample: |Δ| at sampled positions (finite, float32).

    Returns:
        The curve's points and ``p_holding`` (exact when the sample is every entry).
    """
    counts, energy = magnitude_histogram(sample)
    return _curve_points(bucket_curve(counts, energy, sample.numel()))


def sign_conflict_rates(selection: CoreSelection) -> list[list[float | None]]:
    """Share of ``Ci ∩ Cj`` with opposite signs, per pair (None: the cores do not overlap)."""
    n = len(selection.boundaries)
    rates: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            both = int(selection.intersections[i][j])
            if i != j and both:
                rates[i][j] = int(selection.sign_conflicts[i][j]) / both
    return rates


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.0%}" if f"{low:.0%}" == f"{high:.0%}" else f"{low:.0%}-{high:.0%}"


def verdict(
    names: list[str],
    tasks: list[TaskDiagnostics],
    cosine: list[list[float]],
    conflicts: list[list[float | None]],
    groups: list[list[str]] | None,
    core_fraction: float,
) -> list[str]:
    """A few lines, each with its reason: can merging and core isolation help here."""
    lines = []
    norms = {n: t.relative_update_norm for n, t in zip(names, tasks, strict=True)}
    far = [n for n, v in norms.items() if v > EVIDENCE["far"]]
    if far:
        lines.append(
            f"updates of {', '.join(far)} are up to {max(norms[n] for n in far):.1%} of the "
            f"base's norm: far from the regime where merges hold (above {EVIDENCE['far']:.0%};"
            " the toy benchmark's probes at 2.6-4.7% merged barely better than the base)"
        )
    elif all(v < EVIDENCE["close"] for v in norms.values()):
        lines.append(
            f"updates are at most {max(norms.values()):.2%} of the base's norm: small updates "
            "of a good base, the regime where merges hold"
        )
    shares = {n: t.core_energy_share for n, t in zip(names, tasks, strict=True)}
    low = [n for n, v in shares.items() if v < EVIDENCE["low_energy"]]
    high = [n for n, v in shares.items() if v >= EVIDENCE["high_energy"]]
    if low:
        lines.append(
            f"the top {core_fraction:.2%} of the entries of {', '.join(low)} holds only "
            f"{_span([shares[n] for n in low])} of their update energy: freezing those cores "
            "is unlikely to protect them (in the toy benchmark, 11-21% did not reduce "
            "forgetting; on SmolLM2, freezing cores of 6-7% changed nothing)"
        )
    if high:
        lines.append(
            f"the top {core_fraction:.2%} of the entries of {', '.join(high)} holds "
            f"{_span([shares[n] for n in high])} of their update energy: the core is most of "
            "the update, so there is something to protect"
        )
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            rate = conflicts[i][j]
            if rate is not None and rate > EVIDENCE["conflict"]:
                lines.append(
                    f"{a} and {names[j]} move {rate:.0%} of their shared core entries in "
                    f"opposite directions (independent signs: 50%; cosine of the updates "
                    f"{cosine[i][j]:+.2f}): the fusion keeps one task's value there"
                )
    if groups is not None and len(groups) == 1 and len(names) > 1:
        lines.append(
            "every task falls in one group: consolidation freezes nothing, so CPI-FT is the "
            "fusion plus a plain fine-tune (raise tau for stages)"
        )
    return lines
