"""Which task owns each core entry of a tensor (Stage 3, step 1).

A claim is a task's core entries in a tensor (membership is
:func:`cpi_merge.analysis.core_rule.core_mask`, the same float32 arithmetic as the
analysis). When several tasks claim an entry, the largest ``|θi − θ0|`` wins, ties to
the first listed. Only claimed positions are ever materialised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cpi_merge.analysis.core_rule import (
    CoreBoundary,
    as_boundaries,
    core_mask,
    core_mask_at,
    may_hold_core,
)
from cpi_merge.errors import NonFiniteError

NO_POSITIONS = torch.empty(0, dtype=torch.int64)


Claim = tuple[int, torch.Tensor, torch.Tensor]
"""(model index, ascending positions it claims, its |θi − θ0| there)."""


def find_claims(
    base: torch.Tensor,
    values: Sequence[torch.Tensor],
    boundaries: Sequence[CoreBoundary | None],
    scratch: torch.Tensor,
    mask: torch.Tensor,
    *,
    name: str = "",
    start: int = 0,
) -> list[Claim]:
    """Every task's claims on a float32 chunk of one tensor: its core entries there.

    Full-size work per task is one difference and one maximum, plus one comparison and
    one ``nonzero`` where the maximum reaches ``t_i``.

    Args:
        base: θ0's chunk (float32).
        values: Every model's chunk (float32).
        boundaries: Per model, its core's boundary (None: not a task).
        scratch: A float32 buffer of the chunk's size.
        mask: A bool buffer of the chunk's size.
        name: The tensor's name (the tie rule hashes it).
        start: The chunk's first position in the tensor.

    Raises:
        NonFiniteError: θ0 or a task holds NaN/Inf in this chunk.
    """
    claims = []
    for i, (v, t) in enumerate(zip(values, boundaries, strict=True)):
        if t is None:
            continue
        # Same float32 arithmetic as the analysis; never in place (inputs are borrowed).
        delta = torch.sub(v, base, out=scratch).abs_()
        top = float(delta.max())  # NaN if any entry is NaN
        if not math.isfinite(top):
            raise NonFiniteError("θ0 or a task model holds NaN/Inf")
        if may_hold_core(top, t):  # else nothing to claim (cores cluster in few tensors)
            hit = core_mask(delta, t, base=base, name=name, start=start, out=mask)
            at = hit.nonzero().squeeze(1)
            claims.append((i, at, delta[at]))
    return claims


def known_claims(
    base: torch.Tensor,
    flats: Sequence[torch.Tensor],
    boundaries: Sequence[CoreBoundary | None],
    positions: Sequence[torch.Tensor | None],
    *,
    name: str = "",
    start: int = 0,
) -> list[Claim] | None:
    """Claims at core positions found by an analysis: Δ computed there only.

    Args:
        base: θ0 (or the chunk of it that begins at ``start``).
        flats: Every model's values, over the same entries as ``base``.
        boundaries: Per model, its core's boundary (None: not a task).
        positions: Per model, ascending positions of its core within ``base`` (None:
            not a task).
        name: The tensor's name (the tie rule hashes it).
        start: The chunk's first position in the tensor (the tie rule hashes tensor
            positions).

    Returns:
        The claims, or None when a given position is not in its core by the rule: these
        are not the values that were analysed (the caller then finds the cores itself).
    """
    claims = []
    for i, (t, at) in enumerate(zip(boundaries, positions, strict=True)):
        if at is None or t is None:
            continue
        theta0 = base.index_select(0, at).float()
        delta = flats[i].index_select(0, at).float().sub_(theta0).abs_()
        tensor_at = at + start if start else at
        if at.numel() and not bool(
            core_mask_at(delta, t, base=theta0, name=name, positions=tensor_at).all()
        ):
            return None
        claims.append((i, at, delta))
    return claims


def owners(claims: Sequence[Claim]) -> tuple[torch.Tensor, torch.Tensor]:
    """Claimed positions (ascending) and their owner: the largest Δ, ties to the first model.

    Only the claimed positions are touched, never a full-size buffer.
    """
    claims = [c for c in claims if c[1].numel()]
    if not claims:
        return NO_POSITIONS, torch.empty(0, dtype=torch.int64)
    if len(claims) == 1:
        i, at, _ = claims[0]
        return at, torch.full_like(at, i)
    at = torch.cat([c[1] for c in claims])
    delta = torch.cat([c[2] for c in claims])
    model = torch.cat([torch.full_like(c[1], c[0]) for c in claims])
    positions, slot = torch.unique(at, sorted=True, return_inverse=True)
    best = torch.full_like(positions, -math.inf, dtype=delta.dtype)
    best.scatter_reduce_(0, slot, delta, "amax")
    tied_best = delta == best[slot]
    owner = torch.full_like(positions, 1 + max(c[0] for c in claims))  # every slot gets one
    owner.scatter_reduce_(0, slot[tied_best], model[tied_best], "amin")
    return positions, owner


def core_owner(
    theta0: torch.Tensor,
    models: Sequence[torch.Tensor],
    boundaries: Sequence[CoreBoundary | float | None],
    *,
    name: str = "",
) -> torch.Tensor:
    """Which model's core each entry belongs to: its index, or -1 for no core.

    Args:
        theta0: θ0, same shape as every model.
        models: θ1..θM in recipe order.
        boundaries: Per model, its core's boundary (or a bare threshold ``t``: every
            entry with Δ >= t); ``None`` for models that are not tasks.
        name: The tensor's name (the tie rule hashes it).

    Returns:
        int16 tensor shaped like ``theta0``.
    """
    base = theta0.float().reshape(-1)
    claims = find_claims(
        base,
        [m.float().reshape(-1) for m in models],
        as_boundaries(boundaries),
        torch.empty_like(base),
        torch.empty(base.numel(), dtype=torch.bool),
        name=name,
    )
    at, owner = owners(claims)
    result = torch.full((theta0.numel(),), -1, dtype=torch.int16)
    result[at] = owner.to(torch.int16)
    return result.reshape(theta0.shape)
