"""Global flat positions of a parameter → positions in this process's FSDP2 shard.

FSDP2 (``fully_shard``, and transformers' load-time sharding) splits every parameter along
dim 0 like ``torch.chunk``: each of W processes holds ``ceil(rows / W)`` consecutive rows
(the last ones fewer, possibly none), and ``to_local()`` is that block of rows, unpadded,
sharing storage with what FSDP all-gathers. Rows are contiguous in row-major order, so
the local shard is one contiguous range of the parameter's flat positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a sharded parameter, gradient or moment)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (the tensor itself when not sharded).

    In-place edits of the result reach the sharded tensor (shared storage).
    """
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, end)`` that process ``rank`` of ``world_size`` holds (``torch.chunk``)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def local_positions(name: str, param: nn.Parameter, positions: torch.Tensor) -> torch.Tensor:
    """The positions (flat, global) that fall in this process's shard, made local (int32).

    Args:
        name: The parameter's name (for errors).
        param: The parameter: a plain tensor (all positions kept) or an FSDP2 DTensor.
        positions: Flat positions in the whole parameter.

    Raises:
        NotImplementedError: A sharding other than ``Shard(0)`` on a 1-D mesh.
    """
    if not is_sharded(param):
        return positions
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise NotImplementedError(
            f"{name}: exact freezing supports FSDP2's default sharding (Shard(0) on a 1-D "
            f"mesh); this parameter has {tuple(param.placements)} on a {mesh.ndim}-D mesh"
        )
    shape = tuple(param.shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    start, end = local_rows(shape[0] if shape else 1, mesh.size(), mesh.get_local_rank())
    low, high = start * row, end * row
    assert local_tensor(param).numel() == high - low, (name, local_tensor(param).shape)
    kept = positions[(positions >= low) & (positions < high)]
    return (kept.long() - low).to(torch.int32)
