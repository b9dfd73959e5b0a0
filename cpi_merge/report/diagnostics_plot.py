"""The diagnostics picture: how concentrated each update is, and how the updates relate.

Left: the share of each task's Σ (θi − θ0)² its core holds (a star at its share of
entries, log scale) and the whole curve: the share held by the largest-|Δ| entries for
other fractions (estimated from a sample unless exact, as the title says). The core
fraction p is marked. Right: the
cosine of the updates for every pair, with the sign-conflict rate inside the core overlap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cpi_merge.analysis.diagnostics import EVIDENCE
from cpi_merge.analysis.plan import CorePlan

DIAGNOSTICS_PNG = "diagnostics.png"


def plot_diagnostics(plan: CorePlan, path: str | Path) -> None:
    """Draw the diagnostics picture of an analysed plan."""
    names = plan.task_names
    n = len(names)
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    if any(task.energy_curve for task in plan.tasks):
        _energy_curves(plan, left)
    else:
        _core_energy_bars(plan, left)
    cosine = np.asarray(plan.task_cosine)
    im = right.imshow(cosine, cmap="coolwarm", vmin=-1, vmax=1)
    right.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    right.set_yticks(range(n), names, fontsize=8)
    rates = plan.sign_conflict_rate or [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            text = "—" if i == j else f"{cosine[i, j]:+.2f}"
            if i != j and rates[i][j] is not None:
                text += f"\n{rates[i][j]:.0%} opp."
            right.text(j, i, text, ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=right, fraction=0.046, pad=0.04, label="cosine of the updates")
    right.set_title("Update directions (opp.: opposite signs in the core overlap)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _energy_curves(plan: CorePlan, ax) -> None:
    """Each task's measured energy curve, its core as a star."""
    for i, task in enumerate(plan.tasks):
        color = f"C{i % 10}"
        if task.energy_curve:
            xs, ys = zip(*task.energy_curve, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, color=color)
        if task.core_energy_share is not None and task.core_count is not None:
            share = task.core_count / plan.total_parameters
            ax.plot([share], [task.core_energy_share], "*", ms=10, color=color, label=task.name)
    ax.axvline(plan.core_fraction, color="grey", ls="--", lw=0.8)
    ax.text(plan.core_fraction, 0.02, f" p = {plan.core_fraction:g}", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("share of entries (largest |θi − θ0| first)")
    ax.set_ylabel("share of the update energy Σ(θi − θ0)²")
    how = (
        "exact"
        if plan.energy_curve_sample is None
        else (f"estimated from {plan.energy_curve_sample:,} sampled entries; exact: --energy-curve")
    )
    ax.set_title(
        f"How much of each update the top entries hold (★: the core, exact)\n({how})", fontsize=9
    )
    ax.legend(fontsize=7)


def _core_energy_bars(plan: CorePlan, ax) -> None:
    """The share of each update's energy its core holds, against the verdict's lines."""
    names = plan.task_names
    shares = [t.core_energy_share or 0.0 for t in plan.tasks]
    ax.bar(range(len(names)), shares, color=[f"C{i % 10}" for i in range(len(names))])
    for share, label in ((EVIDENCE["low_energy"], "low"), (EVIDENCE["high_energy"], "high")):
        ax.axhline(share, color="grey", ls="--", lw=0.8)
        ax.text(-0.4, share, f"{label} ({share:.0%})", fontsize=7, color="grey", va="bottom")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share of the update energy Σ(θi − θ0)²")
    ax.set_title(
        f"Energy held by each core (top {plan.core_fraction:.2%}; whole curves: --energy-curve)",
        fontsize=10,
    )
