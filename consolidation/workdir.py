"""The hidden work folder beside OUT_DIR where stages and checkpoints live until the end.

Probes and consolidation both work in ``.<OUT>.work`` so an interrupted run can
``--resume``; OUT_DIR itself appears only when every stage is done.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from consolidation.training.distributed import barrier, is_main_process
from cpi_merge.errors import OutputError
from cpi_merge.io.output_dir import check_output_location


def work_dir_for(out_dir: Path) -> Path:
    """The hidden folder next to OUT_DIR where stages and checkpoints live until the end."""
    out_dir = Path(out_dir).resolve()
    return out_dir.parent / f".{out_dir.name}.work"


def prepare_work_dir(out_dir: Path, *, force: bool, resume: bool, inputs: list[str]) -> Path:
    """Check OUT_DIR, then keep (``resume``), discard (``force``) or refuse an earlier run's work.

    Returns:
        The work folder (every process waits until rank 0 has cleared it).

    Raises:
        OutputError: OUT_DIR is unsafe, or an earlier run's work exists without
            ``--resume`` / ``--force``.
    """
    check_output_location(out_dir, force=force, inputs=inputs)
    work = work_dir_for(out_dir)
    if work.exists() and not resume:
        if not force:
            raise OutputError(
                f"an earlier run left {work} (checkpoints and finished stages); pass --resume "
                "to continue it or --force to discard it"
            )
        barrier()
        if is_main_process():
            shutil.rmtree(work)
    barrier()
    return work
