"""Stage 3 on one tensor: core overwrite, then SLERP fusion of the non-core entries.

Pure tensor maths (no mergekit types), used by the ``cpi`` merge method:

1. Core overwrite. Entry j is in task i's core when ``|θi[j] − θ0[j]| >= t_i`` (the same
   float32 arithmetic as the analysis). A core entry takes ``θi[j]`` bit for bit; when
   several tasks claim it, the largest ``|θi[j] − θ0[j]|`` wins, ties to the first listed.
2. Non-core entries start from the fusion base and fold in every other model, in recipe
   order: ``x ← SLERP(x, θi, ωi)`` over the vector of this tensor's non-core entries,
   computed in float32 (norms and dot product accumulated in float64).

SLERP's defined results (never NaN): when either vector has zero norm, or the angle
between them is below ``epsilon`` or above ``π − epsilon`` (colinear or anti-parallel,
where ``sin θ`` vanishes), the fold is the linear interpolation ``(1 − ω)·x + ω·y``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_DOT_CHUNK = 1 << 22


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    total = 0.0
    for start in range(0, a.numel(), _DOT_CHUNK):
        x = a[start : start + _DOT_CHUNK].double()
        y = b[start : start + _DOT_CHUNK].double()
        total += float(torch.dot(x, y))
    return total


def slerp(x: torch.Tensor, y: torch.Tensor, omega: float, epsilon: float) -> torch.Tensor:
    """Spherical interpolation from ``x`` (ω = 0) to ``y`` (ω = 1) of two float32 vectors.

    Args:
        x: 1-D float32.
        y: 1-D float32, same length.
        omega: Interpolation factor in [0, 1].
        epsilon: Colinearity angle (radians): below it, or within it of π, interpolate
            linearly.

    Returns:
        A new 1-D float32 tensor.

    """
    if x.numel() == 0:
        return x.clone()
    norm_x = math.sqrt(_dot64(x, x))
    norm_y = math.sqrt(_dot64(y, y))
    linear = norm_x == 0.0 or norm_y == 0.0
    if not linear:
        cos = max(-1.0, min(1.0, _dot64(x, y) / (norm_x * norm_y)))
        theta = math.acos(cos)
        linear = theta < epsilon or math.pi - theta < epsilon
    if linear:
        a, b = 1.0 - omega, omega
    else:
        s = math.sin(theta)
        a, b = math.sin((1.0 - omega) * theta) / s, math.sin(omega * theta) / s
    return torch.add(x * a, y, alpha=b)


def core_owner(
    theta0: torch.Tensor, models: Sequence[torch.Tensor], thresholds: Sequence[float | None]
) -> torch.Tensor:
    """Which model's core each entry belongs to: its index, or -1 for no core.

    Args:
        theta0: θ0, same shape as every model.
        models: θ1..θM in recipe order.
        thresholds: ``t_i`` per model; ``None`` for models that are not tasks.

    Returns:
        int16 tensor shaped like ``theta0``.

    """
    base = theta0.float()
    owner = torch.full(theta0.shape, -1, dtype=torch.int16)
    best = torch.zeros(theta0.shape, dtype=torch.float32)
    for i, (model, t) in enumerate(zip(models, thresholds, strict=True)):
        if t is None:
            continue
        delta = torch.sub(model.float(), base).abs_()  # never in place: inputs are borrowed
        # t > 0, so Δ >= t implies Δ > 0 = initial best; strict '>' gives ties to the first.
        claims = (delta >= t) & (delta > best)
        owner.masked_fill_(claims, i)
        torch.where(claims, delta, best, out=best)
        del delta, claims
    return owner


def fuse_tensor(
    theta0: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    thresholds: Sequence[float | None],
    omegas: Sequence[float],
    fusion_base: int,
    epsilon: float,
) -> torch.Tensor:
    """Fuse one tensor: core entries copied from their task, the rest SLERP-folded.

    Args:
        theta0: θ0.
        models: Every model of the recipe, in order (same shape and dtype as θ0).
        thresholds: ``t_i`` (> 0) for tasks, ``None`` for models that are not tasks.
        omegas: ω per model (the factor used when that model is folded in).
        fusion_base: Index of θbase in ``models``.
        epsilon: Colinearity angle for SLERP.

    Returns:
        The fused tensor, in the fusion base's dtype.

    """
    owner = core_owner(theta0, models, thresholds)
    result = models[fusion_base].clone()
    core = owner >= 0
    for i, model in enumerate(models):
        if thresholds[i] is not None:
            mine = owner == i
            result[mine] = model[mine]
    rest = ~core
    x = models[fusion_base][rest].float()
    for i, model in enumerate(models):
        if i != fusion_base:
            x = slerp(x, model[rest].float(), omegas[i], epsilon)
    result[rest] = x.to(result.dtype)
    return result
