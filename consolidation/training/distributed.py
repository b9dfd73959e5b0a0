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


def init_distributed(timeout_s: float = 1800) -> None:
    """Join the process group when launched with several processes (gloo on CPU).

    Args:
        timeout_s: How long a collective waits for the slowest process (the Trainer's
            ``ddp_timeout``; checkpoints of large sharded models are hashed inside one).
    """
    if launched_world_size() > 1 and not is_distributed():
        from datetime import timedelta

        from accelerate import PartialState

        timeout = timedelta(seconds=timeout_s)
        if torch.cuda.is_available():
            PartialState(timeout=timeout)
        else:
            PartialState(cpu=True, backend="gloo", timeout=timeout)


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
    """Whether the processes froze the same entries and hold consistent weights (None: 1).

    Every process reports the count and sum of the frozen global positions it computed
    from the plan. Unsharded, each also reports the sum of all its weights (float64):
    every copy must be the same. Sharded (FSDP2), each process holds its own rows, so
    instead the frozen entries its shards enforce must add up, over the processes, to
    the whole set exactly once.
    """
    if not is_distributed():
        return None
    from consolidation.freezing.shards import is_sharded

    params = list(model.parameters())
    sharded = any(is_sharded(p) for p in params)
    weights = None if sharded else sum(float(p.detach().double().sum()) for p in params)
    mine = (freezer.frozen_entries, freezer.position_sum, weights, freezer.local_entries)
    everyone: list = [None] * world_size()
    torch.distributed.all_gather_object(everyone, mine)
    agree = all(f[:3] == everyone[0][:3] for f in everyone)
    if sharded:
        agree = agree and sum(f[3] for f in everyone) == freezer.frozen_entries
    if not agree:
        LOG.error(
            "rank fingerprints (entries, position sum, weights, local entries) differ: %s", everyone
        )
    return agree


def summed(value: float, *, op: str = "sum") -> float:
    """``value`` summed (or its ``"max"``) over every process (itself in a single process)."""
    if not is_distributed():
        return value
    device = "cpu"
    if torch.distributed.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.tensor([value], dtype=torch.float64, device=device)
    reduce = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(total, op=reduce)
    return type(value)(total.item())
