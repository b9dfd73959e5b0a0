"""Writing a plan to disk: ``cpi_plan.json`` and, for analysed plans, the pictures."""

from __future__ import annotations

import os
from pathlib import Path

from cpi_merge.analysis.plan import PLAN_FILE, CorePlan


def write_plan_files(plan: CorePlan, folder: str | os.PathLike, *, plots: bool = True) -> list[str]:
    """Write ``cpi_plan.json`` (and the pictures, for analysed plans) into ``folder``.

    Returns:
        The file names written.

    """
    folder = Path(folder)
    plan.save(folder / PLAN_FILE)
    return [PLAN_FILE] + (write_plan_pictures(plan, folder) if plots else [])


def write_plan_pictures(plan: CorePlan, folder: str | os.PathLike) -> list[str]:
    """Write the pictures of an analysed plan into ``folder`` (none for a recipe's plan).

    Returns:
        The file names written.

    """
    if not plan.analysed:
        return []
    from cpi_merge.report.plots import write_plots

    return [p.name for p in write_plots(plan, Path(folder))]
