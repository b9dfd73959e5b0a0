"""Trainer checkpoints that can be trusted: a completion marker once every rank has saved.

The Trainer writes ``checkpoint-N`` folders non-atomically, so a marker is written after
every rank has finished saving; resume only ever considers checkpoints with the marker
and refuses one whose files (RNG state of every rank, optimizer, scheduler, trainer
state, weights) are not all there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import TrainerCallback

from consolidation.training.distributed import barrier, world_size
from cpi_merge.errors import ResumeError

COMPLETE_MARKER = ".cpi-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class MarkComplete(TrainerCallback):
    """Write a completion marker into each checkpoint once every rank has saved it."""

    def on_save(self, args, state, control, **kwargs):
        """Mark ``checkpoint-<step>`` complete (rank 0, after a barrier)."""
        barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / COMPLETE_MARKER).write_text(json.dumps({"world_size": world_size()}))
        barrier()
        return control


def _required_files(folder: Path, ranks: int) -> list[str]:
    rng = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]
    weights = (
        "model.safetensors"
        if (folder / "model.safetensors").exists()
        else "model.safetensors.index.json"
    )
    return ["trainer_state.json", "optimizer.pt", "scheduler.pt", weights, *rng]


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` with a completion marker, checked for completeness.

    Raises:
        ResumeError: The newest marked checkpoint lacks a file resume needs, or was
            written by another number of processes.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / COMPLETE_MARKER).exists()
    )
    if not found:
        return None
    folder = found[-1][1]
    ranks = json.loads((folder / COMPLETE_MARKER).read_text())["world_size"]
    if ranks != world_size():
        raise ResumeError(
            f"{folder} was written by {ranks} process(es); this run has {world_size()}. "
            "Resume with the same number of processes"
        )
    missing = [f for f in _required_files(folder, ranks) if not (folder / f).exists()]
    if missing:
        raise ResumeError(f"{folder} is marked complete but lacks {missing}; refusing to resume")
    return folder
