"""Saving and loading a sharded (FSDP2) model's training state: torch distributed checkpoints.

Each process writes and reads its own shard of the weights and of the optimizer's
moments (``torch.distributed.checkpoint``; no process ever holds the whole state), into
a ``sharded/`` folder beside whatever else the checkpoint holds. Collectives: every
process calls these functions.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHARDED_DIR = "sharded"
"""Subfolder of a checkpoint or stage end holding the distributed checkpoint."""
PARAM_GROUPS_FILE = "param_groups.pt"
"""The optimizer's hyperparameters per group (lr, initial_lr, betas...), beside it: a
distributed checkpoint only fills the keys a fresh optimizer already has, and a fresh
one has no ``initial_lr``, which the next stage's scheduler starts from."""


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    from consolidation.freezing.shards import is_sharded

    return any(is_sharded(p) for p in model.parameters())


def save_sharded(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Write the weights' and the optimizer's shards of every process into ``folder/sharded``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from consolidation.training.distributed import is_main_process

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    weights, moments = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": moments}, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    if is_main_process():  # the same on every process
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        torch.save(groups, Path(folder) / PARAM_GROUPS_FILE)


def load_sharded(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Load what :func:`save_sharded` wrote, in place (the parameter objects stay the same).

    The freezer's hooks therefore stay valid, and an optimizer that has not stepped yet
    receives its moments and step counts.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    weights, moments = get_state_dict(model, optimizer)  # the shapes to load into
    state = {"model": weights, "optim": moments}
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    saved = torch.load(Path(folder) / PARAM_GROUPS_FILE, weights_only=True)
    for group, hyperparameters in zip(optimizer.param_groups, saved, strict=True):
        group.update(hyperparameters)
