"""Writing a plan to disk: ``cpi_plan.json`` and, for analysed plans, the pictures."""

from __future__ import annotations

import os
from pathlib import Path

from cpi_merge.analysis.plan import PLAN_FILE, CorePlan
from cpi_merge.io.output_dir import staged_output


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


def write_plan_folder(
    plan: CorePlan,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    plots: bool = True,
    inputs: list[str] | None = None,
) -> Path:
    """Write the plan files into ``out_dir`` atomically (see :mod:`cpi_merge.io.output_dir`).

    Returns:
        The output folder.

    """
    with staged_output(out_dir, force=force, inputs=inputs or []) as tmp:
        write_plan_files(plan, tmp, plots=plots)
    return Path(out_dir)
