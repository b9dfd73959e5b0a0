"""Stage 3 on one tensor: core overwrite, then SLERP fusion of the non-core entries.

Pure tensor maths (no mergekit types), used by the ``cpi`` merge method:

1. Core overwrite. Entry j is in task i's core when ``|θi[j] − θ0[j]| >= t_i`` (the same
   float32 arithmetic as the analysis). A core entry takes ``θi[j]`` bit for bit; when
   several tasks claim it, the largest ``|θi[j] − θ0[j]|`` wins, ties to the first listed.
2. Non-core entries start from the fusion base and fold in every other model, in recipe
   order: ``x ← SLERP(x, θi, ωi)`` over the vector of this tensor's non-core entries.

Every fold step is a linear combination, so the folded vector is ``Σ c_m θm`` over the
models' non-core vectors: the coefficients follow exactly from the Gram matrix of those
vectors (float32 products summed in blocks of 1024, blocks summed in float64: relative
error ~1e-8), and the result is formed once, in float32, in bounded chunks. No step
gathers or scatters the non-core entries; memory beyond the output is a few chunk
buffers plus the positions of the core entries.

SLERP's defined results (never NaN): when either vector has zero norm, or the angle
between them is below ``epsilon`` or above ``π − epsilon`` (colinear or anti-parallel,
where ``sin θ`` vanishes), the fold is the linear interpolation ``(1 − ω)·x + ω·y``. A
folded vector whose squared norm falls below 1e-12 of the largest input's counts as zero.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from cpi_merge.errors import NonFiniteError

CHUNK_ENTRIES = 1 << 22
_GRAM_BLOCK = 1024
_ZERO_NORM = 1e-12


class _Workspace(threading.local):
    """Scratch buffers reused across tensors: fresh large allocations cost page faults."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


_WORKSPACE = _Workspace()
_NO_POSITIONS = torch.empty(0, dtype=torch.int64)


def _float32_thresholds(thresholds: Sequence[float | None]) -> list[float | None]:
    """Δ is float32, so ``Δ >= t`` means ``Δ >= float32(t)``: round once, use everywhere.

    (The analysis's thresholds already are float32 values; a hand-written 0.01 is not.)
    """
    return [None if t is None else float(np.float32(t)) for t in thresholds]


def _check_finite(x: torch.Tensor, what: str) -> None:
    """Raise if ``x`` holds NaN/Inf: one dot product, a full check only if it overflows."""
    if not math.isfinite(float(torch.dot(x, x))) and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} holds NaN/Inf")


Claim = tuple[int, torch.Tensor, torch.Tensor]
"""(model index, ascending positions it claims, its |θi − θ0| there)."""


def _claims(
    base: torch.Tensor,
    values: Sequence[torch.Tensor],
    thresholds: Sequence[float | None],
    scratch: torch.Tensor,
    mask: torch.Tensor,
) -> list[Claim]:
    """Every task's claims on a float32 chunk: the entries with ``|θi − θ0| >= t_i``.

    Full-size work per task is one difference and one maximum, plus one comparison and
    one ``nonzero`` where the maximum reaches ``t_i``.

    Raises:
        NonFiniteError: θ0 or a task holds NaN/Inf in this chunk.
    """
    claims = []
    for i, (v, t) in enumerate(zip(values, thresholds, strict=True)):
        if t is None:
            continue
        # Same float32 arithmetic as the analysis; never in place (inputs are borrowed).
        delta = torch.sub(v, base, out=scratch).abs_()
        top = float(delta.max())  # NaN if any entry is NaN
        if not math.isfinite(top):
            raise NonFiniteError("θ0 or a task model holds NaN/Inf")
        if top >= t:  # else nothing to claim here (often: cores cluster in few tensors)
            at = torch.ge(delta, t, out=mask).nonzero().squeeze(1)
            claims.append((i, at, delta[at]))
    return claims


def _known_claims(
    base: torch.Tensor,
    flats: Sequence[torch.Tensor],
    thresholds: Sequence[float | None],
    positions: Sequence[torch.Tensor | None],
) -> list[Claim] | None:
    """Claims at core positions found by an analysis: Δ computed there only.

    Returns:
        The claims, or None when Δ is below ``t_i`` at a given position: these are not
        the values that were analysed (the caller then finds the cores itself).
    """
    claims = []
    for i, (t, at) in enumerate(zip(thresholds, positions, strict=True)):
        if at is None or t is None:
            continue
        delta = flats[i][at].float().sub_(base[at].float()).abs_()
        if at.numel() and not float(delta.min()) >= t:
            return None
        claims.append((i, at, delta))
    return claims


def _owners(claims: Sequence[Claim]) -> tuple[torch.Tensor, torch.Tensor]:
    """Claimed positions (ascending) and their owner: the largest Δ, ties to the first model.

    Only the claimed positions are touched, never a full-size buffer.
    """
    claims = [c for c in claims if c[1].numel()]
    if not claims:
        return _NO_POSITIONS, torch.empty(0, dtype=torch.int64)
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
    base = theta0.float().reshape(-1)
    claims = _claims(
        base,
        [m.float().reshape(-1) for m in models],
        _float32_thresholds(thresholds),
        torch.empty_like(base),
        torch.empty(base.numel(), dtype=torch.bool),
    )
    at, owner = _owners(claims)
    result = torch.full((theta0.numel(),), -1, dtype=torch.int16)
    result[at] = owner.to(torch.int16)
    return result.reshape(theta0.shape)


def fold_coefficients(
    gram: np.ndarray, fusion_base: int, omegas: Sequence[float], epsilon: float
) -> np.ndarray:
    """Coefficients c with ``Σ c_m v_m`` = the SLERP fold of the vectors ``v_m``.

    Args:
        gram: float64 Gram matrix ``v_a · v_b`` of the models' non-core vectors.
        fusion_base: Index of the starting vector.
        omegas: ω per model (used when that model is folded in).
        epsilon: Colinearity angle (radians).

    Returns:
        float64 coefficients, one per model.

    """
    n = len(gram)
    c = np.zeros(n)
    c[fusion_base] = 1.0
    scale = max(float(np.max(np.diag(gram))), 0.0) if n else 0.0
    for i in range(n):
        if i == fusion_base:
            continue
        w = float(omegas[i])
        xx = float(c @ gram @ c)
        yy = float(gram[i, i])
        xy = float(gram[i] @ c)
        linear = xx <= _ZERO_NORM * scale or yy <= _ZERO_NORM * scale
        if not linear:
            cos = max(-1.0, min(1.0, xy / math.sqrt(xx * yy)))
            theta = math.acos(cos)
            linear = theta < epsilon or math.pi - theta < epsilon
        if linear:
            a, b = 1.0 - w, w
        else:
            s = math.sin(theta)
            a, b = math.sin((1.0 - w) * theta) / s, math.sin(w * theta) / s
        c *= a
        c[i] += b
    return c


def _gram(rows: torch.Tensor) -> np.ndarray:
    """float64 Gram matrix of float32 rows: float32 block products, float64 sum of blocks."""
    n_rows, length = rows.shape
    whole = length - length % _GRAM_BLOCK
    gram = np.zeros((n_rows, n_rows))
    if whole:
        blocks = rows[:, :whole].reshape(n_rows, -1, _GRAM_BLOCK).transpose(0, 1)
        gram += torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(0).numpy()
    if whole < length:
        tail = rows[:, whole:].double()
        gram += (tail @ tail.T).numpy()
    return gram


def fuse_tensor(
    theta0: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    thresholds: Sequence[float | None],
    omegas: Sequence[float],
    fusion_base: int,
    epsilon: float,
    chunk_entries: int = CHUNK_ENTRIES,
    core_positions: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Fuse one tensor: core entries copied from their task, the rest SLERP-folded.

    Args:
        theta0: θ0.
        models: Every model of the recipe, in order (same shape and dtype as θ0).
        thresholds: ``t_i`` (> 0) for tasks, ``None`` for models that are not tasks.
        omegas: ω per model (the factor used when that model is folded in).
        fusion_base: Index of θbase in ``models``.
        epsilon: Colinearity angle for SLERP.
        chunk_entries: Entries per float32 work chunk.
        core_positions: Optional, per model: the ascending flat positions where
            ``|θi − θ0| >= t_i`` (``None`` for models that are not tasks), as found by an
            analysis of these same values that also checked θ0 and the tasks for NaN/Inf.
            The result is the same; only the full-size comparisons are skipped. If Δ
            is below ``t_i`` at one of them (not the analysed values), they are ignored.

    Returns:
        The fused tensor, in the fusion base's dtype. Inputs are not modified.

    Raises:
        NonFiniteError: A model (or θ0, when ``core_positions`` is not given) holds NaN/Inf.
    """
    n_models = len(models)
    thresholds = _float32_thresholds(thresholds)
    base_flat = theta0.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    total = base_flat.numel()
    width = min(chunk_entries, max(total, 1))
    rows = _WORKSPACE.take("rows", n_models * width, torch.float32).view(n_models, width)

    others = [i for i, t in enumerate(thresholds) if t is None]
    known_at = known_of = None
    known = None
    if core_positions is not None:
        known = _known_claims(base_flat, flats, thresholds, core_positions)
    if known is not None:
        known_at, known_of = _owners(known)
        edges = torch.arange(0, total + chunk_entries, chunk_entries)
        bounds = torch.searchsorted(known_at, edges).tolist()
    else:
        base_buf = _WORKSPACE.take("base", width, torch.float32)
        scratch = _WORKSPACE.take("scratch", width, torch.float32)
        mask = _WORKSPACE.take("mask", width, torch.bool)

    # Pass 1: core owners and the Gram matrix of the non-core entries.
    gram = np.zeros((n_models, n_models))
    core_at, core_of = [], []
    for index, start in enumerate(range(0, total, chunk_entries)):
        stop = min(start + chunk_entries, total)
        m = stop - start
        v = rows[:, :m]
        for i, flat in enumerate(flats):
            v[i].copy_(flat[start:stop])
        if known_at is None:
            base = base_buf[:m].copy_(base_flat[start:stop])
            _check_finite(base, "θ0")
            at, owner = _owners(_claims(base, list(v), thresholds, scratch[:m], mask[:m]))
            core_at.append(at + start)
            core_of.append(owner)
        else:
            at = known_at[bounds[index] : bounds[index + 1]] - start
        if at.numel():
            # Zeroing hides these columns from the Gram check below: look at them first
            # (tasks were already checked through their Δ).
            for i in others:
                if not bool(torch.isfinite(v[i].index_select(0, at)).all()):
                    raise NonFiniteError("a model that is not a task holds NaN/Inf")
            v.index_fill_(1, at, 0.0)
        gram += _gram(v)
    if not np.isfinite(gram).all():
        raise NonFiniteError("a model holds NaN/Inf (or the norms overflow)")
    coef = fold_coefficients(gram, fusion_base, omegas, epsilon).astype(np.float32).tolist()

    # Pass 2: the fold as one linear combination, then the core entries copied bit for bit.
    result = torch.empty(total, dtype=models[fusion_base].dtype)
    folded = _WORKSPACE.take("folded", width, torch.float32)
    for start in range(0, total, chunk_entries):
        stop = min(start + chunk_entries, total)
        v = rows[:, : stop - start]
        if total > chunk_entries:  # one chunk: the rows of pass 1 are still there
            for i, flat in enumerate(flats):
                v[i].copy_(flat[start:stop])
        # Σ c_m v_m, row by row (faster than a matrix-vector product on CPU); core
        # entries (zeroed in pass 1) are set below.
        acc = torch.mul(v[0], coef[0], out=folded[: stop - start])
        for i in range(1, n_models):
            acc.add_(v[i], alpha=coef[i])
        result[start:stop].copy_(acc)
    if known_at is not None:
        at, of = known_at, known_of
    elif core_at:
        at, of = torch.cat(core_at), torch.cat(core_of)
    else:  # an empty tensor
        at, of = _NO_POSITIONS, _NO_POSITIONS
    if at.numel():
        for i, t in enumerate(thresholds):
            if t is not None:
                mine = at[of == i]
                result[mine] = flats[i][mine]
    return result.reshape(theta0.shape)
