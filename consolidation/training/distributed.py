"""Several training processes (``torchrun`` / ``accelerate launch``): joining, waiting, agreeing.

On a CPU box the process group uses gloo. Every helper is a no-op in a single process.
"""

from __future__ import annotations

import logging
import os

import torch

LOG = logging.getLogger(__name__)


def launched_world_size() -> int:
    """Processes the launcher (``accelerate launch`` / ``torchrun``) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the process group when launched with several processes (gloo on CPU)."""
    if launched_world_size() > 1 and not is_distributed():
        from accelerate import PartialState

        if torch.cuda.is_available():
            PartialState()
        else:
            PartialState(cpu=True, backend="gloo")


def is_distributed() -> bool:
    """Whether torch.distributed is initialised with more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def world_size() -> int:
    """Number of training processes."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def ranks_agree(freezer, model: torch.nn.Module) -> bool | None:
    """Whether every rank froze the same positions and holds the same weights (None: 1 rank).

    A fingerprint is gathered from every process and compared: the count and sum of the
    frozen global positions and, unless the parameters are sharded (then each process
    holds its own part, by design), the sum of all weights in float64.
    """
    if not is_distributed():
        return None
    from consolidation.freezing.shards import is_sharded

    params = list(model.parameters())
    sharded = any(is_sharded(p) for p in params)
    weights = None if sharded else sum(float(p.detach().double().sum()) for p in params)
    mine = (freezer.frozen_entries, freezer.position_sum, weights)
    everyone: list = [None] * world_size()
    torch.distributed.all_gather_object(everyone, mine)
    agree = all(f == everyone[0] for f in everyone)
    if not agree:
        LOG.error("rank fingerprints differ: %s", everyone)
    return agree


def summed(value: float, *, op: str = "sum") -> float:
    """``value`` summed (or its ``"max"``) over every process (itself in a single process)."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    reduce = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(total, op=reduce)
    return type(value)(total.item())
