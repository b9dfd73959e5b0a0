"""Exact partial freezing: chosen entries of parameters stay bit-identical through training.

Zeroing gradients is not enough: AdamW's decoupled weight decay moves every parameter with
a gradient, and Adam moments carried from earlier steps keep moving an entry after its
gradient is masked. So the update itself is masked, in two places:

1. After every backward (each micro-batch), the gradient at frozen entries is overwritten
   with 0 in place (``register_post_accumulate_grad_hook``): before gradient clipping (the
   clip norm does not count frozen entries), before the optimizer, and a NaN/Inf gradient
   at a frozen entry is dropped instead of poisoning the clip norm.
2. After every optimizer step, frozen entries are written back from a stored copy, which
   undoes weight decay, momentum and anything else the optimizer did there. Moments an
   optimizer carries into a stage are zeroed at frozen entries when the freezer attaches;
   with zero gradients there, Adam's moments then stay exactly zero.

Only the frozen entries are stored (int32 positions + values): at p = 1% and three tasks
a fraction of a byte per model parameter, with no full-size mask or copy. Pure torch: the
freezer knows nothing of the Trainer that drives the optimizer.

Sharded parameters (FSDP2 ``fully_shard``: DTensors split along dim 0) work the same way,
on each process's own shard: the freezer keeps only the frozen positions that fall in the
local rows (storage per process ≈ total / world size), and every edit goes through
``to_local()``. FSDP2 calls the gradient hooks on the sharded parameter right after its
reduce-scatter, so the masked gradient is what clipping and the optimizer see on every
process. The freezer must be built after sharding (``fully_shard`` replaces every
parameter object).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from consolidation.freezing.shards import local_positions, local_tensor

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class ExactFreezer:
    """Keep the given entries of a model's parameters bit-identical.

    Args:
        model: The model being trained (its own parameters, not copies).
        frozen: Parameter name → flat positions to freeze (any integer tensor). Names
            must be parameters of ``model``; empty entries are ignored.

    Raises:
        KeyError: A name is not a parameter of the model.
        ValueError: A position is out of range.
    """

    def __init__(self, model: nn.Module, frozen: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.positions: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.global_entries = 0
        """Frozen entries over the whole model (every process's shard together)."""
        self.position_sum = 0
        """Sum of the global positions: with ``global_entries``, a fingerprint of the masks
        that every process can compare, sharded or not."""
        for name, pos in frozen.items():
            if name not in params:
                raise KeyError(f"{name!r} is not a parameter of the model")
            if pos.numel() == 0:
                continue
            p = params[name]
            pos = pos.to(torch.int32).flatten()
            if int(pos.min()) < 0 or int(pos.max()) >= p.numel():
                raise ValueError(f"{name}: frozen positions outside [0, {p.numel()})")
            self.global_entries += pos.numel()
            self.position_sum += int(pos.long().sum())
            pos = local_positions(name, p, pos)  # this process's shard (all: not sharded)
            if pos.numel() == 0:
                continue
            self.params[name] = p
            self.positions[name] = pos
            self.values[name] = local_tensor(p).detach().reshape(-1)[pos.long()].cpu()
        self._handles: list = []
        self._moved: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.masked_gradients = 0
        """Gradient hook calls so far (evidence that the masking ran, not only the restore)."""

    @property
    def frozen_entries(self) -> int:
        """Number of frozen entries (over the whole model, when sharded)."""
        return self.global_entries

    @property
    def local_entries(self) -> int:
        """Frozen entries this process enforces (its shard; all of them when not sharded)."""
        return sum(p.numel() for p in self.positions.values())

    @property
    def stored_bytes(self) -> int:
        """Memory this process's freezer holds: positions and values of its frozen entries."""
        return sum(
            p.numel() * p.element_size() + v.numel() * v.element_size()
            for p, v in zip(self.positions.values(), self.values.values(), strict=True)
        )

    def attach(self, optimizer: torch.optim.Optimizer) -> ExactFreezer:
        """Start enforcing: gradient hooks on the parameters, a post-step hook on ``optimizer``.

        Moments the optimizer already holds for frozen entries (a carried optimizer) are
        zeroed now, so stale momentum cannot move them. An accelerate ``AcceleratedOptimizer``
        (what Trainer callbacks receive) is unwrapped to the optimizer it drives.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.detach()
        for name, p in self.params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._zero_moments(optimizer)
        return self

    def detach(self) -> None:
        """Stop enforcing (remove every hook)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (int64) and values of ``name`` on ``device`` (a GPU copy is kept once).

        The stored copy stays in CPU memory as int32; where the parameter lives elsewhere
        (the Trainer moves the model to the GPU after the freezer is built, FSDP shards
        live on their device) the copy there is made once and reused.
        """
        pos, values = self.positions[name], self.values[name]
        if device == pos.device:
            return pos.long(), values
        moved = self._moved.get((name, device))
        if moved is None:
            moved = self._moved[(name, device)] = (pos.to(device, torch.long), values.to(device))
        return moved

    def _grad_hook(self, name: str):
        def hook(param: nn.Parameter) -> None:
            if param.grad is not None:
                grad = local_tensor(param.grad)
                grad.view(-1).index_fill_(0, self._on(name, grad.device)[0], 0.0)
                self.masked_gradients += 1

        return hook

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, *_args, **_kwargs) -> None:
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Write the stored values back into the frozen entries."""
        for name, p in self.params.items():
            local = local_tensor(p)
            local.view(-1).index_copy_(0, *self._on(name, local.device))

    @torch.no_grad()
    def _zero_moments(self, optimizer: torch.optim.Optimizer) -> None:
        for name, p in self.params.items():
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in _MOMENT_KEYS:
                moment = state.get(key)
                if isinstance(moment, torch.Tensor) and moment.shape == p.shape:
                    local = local_tensor(moment)
                    local.view(-1).index_fill_(0, self._on(name, local.device)[0], 0.0)

    def drift(self) -> int:
        """Frozen entries of this process whose bits differ from the stored values.

        0 while enforced; sum it over processes when sharded.
        """
        changed = 0
        for name, p in self.params.items():
            local = local_tensor(p).detach()
            now = local.reshape(-1)[self._on(name, local.device)[0]].cpu()
            changed += int((as_bits(now) != as_bits(self.values[name])).sum())
        return changed


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (so -0.0 != 0.0 and NaN == NaN)."""
    kind = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(kind)
