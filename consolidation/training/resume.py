"""What a stage leaves for ``--resume``: its weights (safetensors) and optimizer state.

A sharded model (FSDP2) leaves a distributed checkpoint instead (each process its shard,
:mod:`consolidation.training.sharded_state`): then every process calls these functions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from consolidation.training.sharded_state import (
    SHARDED_DIR,
    is_sharded_model,
    load_sharded,
    save_sharded,
)
from cpi_merge.errors import ResumeError


def save_for_resume(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Save weights (safetensors, training precision) and optimizer state at a stage end."""
    from safetensors.torch import save_file

    if is_sharded_model(model):
        save_sharded(model, optimizer, folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedupe(state), str(folder / "weights.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_for_resume(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Load what :func:`save_for_resume` wrote (``weights_only`` torch.load)."""
    from safetensors.torch import load_file

    if is_sharded_model(model):
        if not (folder / SHARDED_DIR).is_dir():
            raise ResumeError(f"{folder}: not saved by a sharded run (resume it the same way)")
        load_sharded(model, optimizer, folder)
        return
    if not (folder / "weights.safetensors").exists():
        raise ResumeError(f"{folder}: saved by a sharded run (resume it the same way)")
    missing, unexpected = model.load_state_dict(
        load_file(str(folder / "weights.safetensors")), strict=False
    )
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ResumeError(
            f"{folder}: stage weights do not match the model ({missing}, {unexpected})"
        )
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied duplicates (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out
