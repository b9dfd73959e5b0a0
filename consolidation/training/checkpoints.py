"""Trainer checkpoints that can be trusted: a completion marker once every rank has saved.

The Trainer writes ``checkpoint-N`` folders non-atomically, so a marker is written after
every rank has finished saving; resume only ever considers checkpoints with the marker
and refuses one whose files (RNG state of every rank, optimizer, scheduler, trainer
state, weights) are not all there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers import TrainerCallback

from consolidation.training.distributed import barrier, world_size
from consolidation.training.integrity import SEAL, read_seal, seal, seal_problems
from consolidation.training.sharded_state import SHARDED_DIR
from cpi_merge.errors import ResumeError

COMPLETE_MARKER = SEAL
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
LOG = logging.getLogger(__name__)


class MarkComplete(TrainerCallback):
    """Seal each checkpoint (sizes and hashes of its files) once every rank has saved it."""

    def on_save(self, args, state, control, **kwargs):
        """Seal ``checkpoint-<step>`` (rank 0, after a barrier)."""
        barrier()
        if state.is_world_process_zero:
            seal(Path(args.output_dir) / f"checkpoint-{state.global_step}", world_size=world_size())
        barrier()
        return control


def _required_files(folder: Path, ranks: int) -> list[str]:
    rng = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]
    if (folder / SHARDED_DIR).is_dir():  # FSDP2: weights and moments are in the shards
        return ["trainer_state.json", "scheduler.pt", f"{SHARDED_DIR}/.metadata", *rng]
    weights = (
        "model.safetensors"
        if (folder / "model.safetensors").exists()
        else "model.safetensors.index.json"
    )
    return ["trainer_state.json", "optimizer.pt", "scheduler.pt", weights, *rng]


def _problems(folder: Path) -> list[str]:
    record = read_seal(folder) or {}
    ranks = record.get("world_size")
    if ranks is not None and ranks != world_size():
        return [
            f"{folder} was written by {ranks} process(es); this run has {world_size()} "
            "(resume with the same number of processes)"
        ]
    missing = [f for f in _required_files(folder, ranks or 1) if not (folder / f).exists()]
    if missing:
        return [f"{folder} lacks {missing}"]
    return seal_problems(folder)


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest sealed ``checkpoint-N`` whose files all match their seal.

    A damaged newer checkpoint is skipped, with a warning naming the file; the run then
    resumes from the newest one that verifies.

    Raises:
        ResumeError: Checkpoints are sealed but none verifies (every problem named).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name))),
        reverse=True,
    )
    damaged = []
    for _, folder in found:
        if read_seal(folder) is None:
            continue  # never completed: a save that was interrupted
        problems = _problems(folder)
        if not problems:
            if damaged:
                LOG.warning(
                    "resuming from %s: newer checkpoint(s) are damaged: %s",
                    folder.name,
                    "; ".join(damaged),
                )
            return folder
        damaged += problems
    if damaged:
        raise ResumeError("no checkpoint to resume from verifies: " + "; ".join(damaged))
    return None
