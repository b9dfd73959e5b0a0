"""What a stage leaves for ``--resume``: its weights (safetensors) and optimizer state."""

from __future__ import annotations

from pathlib import Path

import torch

from cpi_merge.errors import ResumeError


def save_for_resume(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Save weights (safetensors, training precision) and optimizer state at a stage end."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedupe(state), str(folder / "weights.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_for_resume(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Load what :func:`save_for_resume` wrote (``weights_only`` torch.load)."""
    from safetensors.torch import load_file

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
