"""The consolidation report (JSON) and its loss-curve picture."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_FILE = "consolidation_report.json"
LOSS_PNG = "loss_curve.png"


@dataclass
class StageRecord:
    """What one stage did."""

    index: int
    tasks: list[str]
    frozen_entries: int
    trainable_entries: int
    steps: int
    first_loss: float | None
    last_loss: float | None
    freezer_bytes: int
    """Bytes the freezer holds (the largest process's, when sharded)."""
    ranks_agree: bool | None = None
    """Multi-process runs: every rank froze the same entries and ended with the same weights
    (sharded: the processes' shards enforce every frozen entry exactly once)."""
    masked_gradients: int = 0
    """Gradient-masking hook calls (all processes): the masking ran, not only the restore."""
    losses: list[tuple[int, float]] = field(default_factory=list)


def write_report(path: Path, header: dict, stages: list[StageRecord]) -> None:
    """Write ``consolidation_report.json`` (per-step losses are kept in the picture only)."""
    rows = []
    for s in stages:
        row = asdict(s)
        row.pop("losses")
        rows.append(row)
    path.write_text(json.dumps({**header, "stages": rows}, indent=1) + "\n", encoding="utf-8")


def plot_losses(path: Path, stages: list[StageRecord], title: str) -> None:
    """Training loss over the whole run, one colour per stage, stage boundaries marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    offset = 0
    for s in stages:
        if s.losses:
            steps = [offset + step for step, _ in s.losses]
            ax.plot(
                steps,
                [loss for _, loss in s.losses],
                marker=".",
                ms=3,
                label=f"stage {s.index}: " + ", ".join(s.tasks),
            )
        offset += s.steps
        ax.axvline(offset, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    if any(s.losses for s in stages):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
