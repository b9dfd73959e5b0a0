"""Pictures of an analysis: the Jaccard heatmap and the map of where each core lives.

Uses matplotlib's object API (no pyplot global state), so pictures can be drawn in a
background thread while a merge runs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.report.core_map import DensityTable, density_by_layer, density_by_module
from cpi_merge.report.diagnostics_plot import DIAGNOSTICS_PNG, plot_diagnostics

JACCARD_PNG = "jaccard.png"
CORE_MAP_PNG = "core_map.png"


def plot_jaccard(plan: CorePlan, path: str | Path) -> None:
    """Heatmap of the Jaccard matrix, annotated, with each task's group in its label."""
    labels = plan.task_names
    group_of = {name: g + 1 for g, names in enumerate(plan.groups) for name in names}
    ticks = [f"{name}\n(stage {group_of[name]})" for name in labels]
    jac = np.asarray(plan.jaccard)
    n = len(labels)
    off = jac[~np.eye(n, dtype=bool)]
    top = max(float(off.max()) if off.size else 0.0, plan.tau, 0.01)
    shown = np.ma.masked_array(jac, mask=np.eye(n, dtype=bool))
    size = 2.2 + 0.9 * n
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#cccccc")
    im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=top)
    ax.set_xticks(range(n), ticks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), ticks, fontsize=8)
    for i in range(n):
        for j in range(n):
            linked = i != j and jac[i, j] >= plan.tau and jac[i, j] > 0
            ax.text(
                j,
                i,
                "—" if i == j else f"{jac[i, j]:.3f}",
                ha="center",
                va="center",
                fontsize=8,
                fontweight="bold" if linked else "normal",
                color="black" if i == j or jac[i, j] > 0.6 * top else "white",
            )
            if linked:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="cyan", lw=2))
    fig.colorbar(
        im, ax=ax, fraction=0.046, pad=0.04, label="Jaccard |Ci ∩ Cj| / |Ci ∪ Cj| (boxed: >= tau)"
    )
    ax.set_title(
        f"Core overlap (p = {plan.core_fraction:g}, tau = {plan.tau:g}: "
        f"{len(plan.groups)} group(s))",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _panel(fig, ax, table: DensityTable, labels: list[str], title: str, uniform: float) -> None:
    pct = 100.0 * table.density
    im = ax.imshow(pct, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    step = max(1, len(table.blocks) // 40)
    ax.set_xticks(range(0, len(table.blocks), step), table.blocks[::step], rotation=90, fontsize=7)
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, pad=0.01)
    cbar.set_label(f"% of entries in core\n(uniform = {100 * uniform:g}%)", fontsize=8)


def plot_core_map(plan: CorePlan, path: str | Path) -> None:
    """Core density per layer (top) and per module kind (bottom), one row per task."""
    labels = plan.task_names
    by_layer, by_module = density_by_layer(plan), density_by_module(plan)
    height = 1.6 + 0.35 * len(labels)
    width = min(22.0, 4.0 + 0.22 * max(len(by_layer.blocks), len(by_module.blocks)))
    fig = Figure(figsize=(width, 2 * height + 1.5))
    axes = fig.subplots(2, 1)
    _panel(fig, axes[0], by_layer, labels, "Where each core lives: by layer", plan.core_fraction)
    _panel(fig, axes[1], by_module, labels, "... and by module kind", plan.core_fraction)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_plots(plan: CorePlan, folder: str | Path) -> list[Path]:
    """Write every picture of the analysis into ``folder``; return their paths."""
    folder = Path(folder)
    paths = [folder / JACCARD_PNG, folder / CORE_MAP_PNG]
    plot_jaccard(plan, paths[0])
    plot_core_map(plan, paths[1])
    if plan.task_cosine is not None:
        paths.append(folder / DIAGNOSTICS_PNG)
        plot_diagnostics(plan, paths[-1])
    return paths
