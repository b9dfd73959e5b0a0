"""The hidden work folder beside OUT_DIR where stages and checkpoints live until the end.

Probes and consolidation both work in ``.<OUT>.work`` so an interrupted run can
``--resume``; OUT_DIR itself appears only when every stage is done. The run holds OUT's
lock throughout (rank 0), so a second run into the same output fails at once, and a
resume is refused when the config, plan, model or data changed
(:mod:`consolidation.fingerprint`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from consolidation.fingerprint import check_same_run, write_fingerprint
from consolidation.training.distributed import barrier, is_main_process
from consolidation.training.integrity import SEAL
from cpi_merge.errors import OutputError
from cpi_merge.io.output_dir import check_output_location
from cpi_merge.io.output_lock import OutputLock


def work_dir_for(out_dir: Path) -> Path:
    """The hidden folder next to OUT_DIR where stages and checkpoints live until the end."""
    out_dir = Path(out_dir).resolve()
    return out_dir.parent / f".{out_dir.name}.work"


@contextmanager
def work_session(
    out_dir: Path, *, force: bool, resume: bool, inputs: list[str], fingerprint: dict[str, Any]
) -> Iterator[Path]:
    """Lock OUT_DIR, then keep (``resume``), discard (``force``) or refuse an earlier run's work.

    Yields:
        The work folder (every process waits until rank 0 has prepared it).

    Raises:
        OutputError: OUT_DIR is unsafe or locked by another run, or an earlier run's work
            exists without ``--resume`` / ``--force``.
        ResumeError: ``--resume`` of a run started with another config, plan, model or data.
    """
    out = check_output_location(out_dir, force=force, inputs=inputs)
    work = work_dir_for(out_dir)
    lock = OutputLock(out, what="output") if is_main_process() else None
    if lock is not None:
        lock.acquire()
    fresh = not work.exists() or force
    try:
        if is_main_process():
            if work.exists() and resume:
                check_same_run(work, fingerprint)
            elif work.exists() and not force:
                raise OutputError(
                    f"an earlier run left {work} (checkpoints and finished stages); pass "
                    "--resume to continue it or --force to discard it"
                )
            elif work.exists():
                shutil.rmtree(work)
            if not (work / "run.json").exists():
                write_fingerprint(work, fingerprint)
        barrier()
        yield work
    except BaseException:
        # A run that failed before saving anything resumable leaves no work folder behind
        # (so the next run needs no --force); saved checkpoints and stages are kept.
        if fresh and is_main_process() and not any(work.rglob(SEAL)):
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()
