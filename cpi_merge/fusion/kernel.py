"""Stage 3 on one tensor: core overwrite, then SLERP fusion of the non-core entries.

Pure tensor maths (no mergekit types), used by the ``cpi`` merge method:

1. Core overwrite (:mod:`~cpi_merge.fusion.claims`). A core entry takes ``θi[j]`` bit
   for bit; when several tasks claim it, the largest ``|θi[j] − θ0[j]|`` wins, ties to
   the first listed.
2. Non-core entries start from the fusion base and fold in every other model, in recipe
   order: ``x ← SLERP(x, θi, ωi)`` over the vector of this tensor's non-core entries
   (:mod:`~cpi_merge.fusion.fold`), formed once, in float32, in bounded chunks.

No step gathers or scatters the non-core entries; memory beyond the output is a few
chunk buffers plus the positions of the core entries.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from cpi_merge.analysis.core_rule import CoreBoundary, as_boundaries
from cpi_merge.errors import NonFiniteError
from cpi_merge.fusion.claims import find_claims, known_claims, owners
from cpi_merge.fusion.fold import fold_coefficients, gram_matrix

CHUNK_ENTRIES = 1 << 20


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


def _check_finite(x: torch.Tensor, what: str) -> None:
    """Raise if ``x`` holds NaN/Inf: one dot product, a full check only if it overflows."""
    if not math.isfinite(float(torch.dot(x, x))) and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} holds NaN/Inf")


def fuse_tensor(
    theta0: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    boundaries: Sequence[CoreBoundary | float | None],
    omegas: Sequence[float],
    fusion_base: int,
    epsilon: float,
    name: str = "",
    analysed_entries: int | None = None,
    chunk_entries: int = CHUNK_ENTRIES,
    core_positions: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Fuse one tensor: core entries copied from their task, the rest SLERP-folded.

    Args:
        theta0: θ0.
        models: Every model of the recipe, in order (same shape and dtype as θ0).
        boundaries: Per model, its core's boundary (or a bare threshold ``t``: every
            entry with Δ >= t); ``None`` for models that are not tasks.
        omegas: ω per model (the factor used when that model is folded in).
        fusion_base: Index of θbase in ``models``.
        epsilon: Colinearity angle for SLERP.
        name: The tensor's name (the tie rule hashes it).
        analysed_entries: Only the first this many flat entries take part in cores and
            the fold; the rest (embedding rows of tokens θ0 lacks) keep the fusion
            base's value. None: every entry.
        chunk_entries: Entries per float32 work chunk.
        core_positions: Optional, per model: the ascending flat positions of its core
            (``None`` for models that are not tasks), as found by an analysis of these
            same values that also checked θ0 and the tasks for NaN/Inf. The result is
            the same; only the full-size comparisons are skipped. If one of them is not
            in its core by the rule (not the analysed values), they are ignored.

    Returns:
        The fused tensor, in the fusion base's dtype. Inputs are not modified.

    Raises:
        NonFiniteError: A model (or θ0, when ``core_positions`` is not given) holds NaN/Inf.
    """
    rule = dict(
        boundaries=boundaries,
        omegas=omegas,
        fusion_base=fusion_base,
        epsilon=epsilon,
        name=name,
        chunk_entries=chunk_entries,
    )
    if analysed_entries is not None and analysed_entries < theta0.numel():
        head = fuse_tensor(
            theta0.reshape(-1)[:analysed_entries],
            [m.reshape(-1)[:analysed_entries] for m in models],
            core_positions=core_positions,
            **rule,
        )
        tail = models[fusion_base].reshape(-1)[analysed_entries:]
        return torch.cat([head, tail]).reshape(theta0.shape)
    n_models = len(models)
    thresholds = as_boundaries(boundaries)
    base_flat = theta0.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    total = base_flat.numel()
    width = min(chunk_entries, max(total, 1))
    rows = _WORKSPACE.take("rows", n_models * width, torch.float32).view(n_models, width)
    others = [i for i, t in enumerate(thresholds) if t is None]
    starts = range(0, total, chunk_entries)
    in_range = core_positions is not None and all(
        p is None or not p.numel() or (int(p[0]) >= 0 and int(p[-1]) < total)
        for p in core_positions
    )
    known = _split_positions(core_positions, starts, total) if in_range else None
    if known is None:
        base_buf = _WORKSPACE.take("base", width, torch.float32)
        scratch = _WORKSPACE.take("scratch", width, torch.float32)
        mask = _WORKSPACE.take("mask", width, torch.bool)

    # Pass 1, chunk by chunk: core owners (chunk positions) and the Gram matrix of the
    # non-core entries.
    gram = np.zeros((n_models, n_models))
    chunk_cores: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, start in enumerate(starts):
        stop = min(start + chunk_entries, total)
        m = stop - start
        v = rows[:, :m]
        for i, flat in enumerate(flats):
            v[i].copy_(flat[start:stop])
        if known is not None:
            claims = known_claims(
                base_flat[start:stop],
                [f[start:stop] for f in flats],
                thresholds,
                known[index],
                name=name,
                start=start,
            )
            if claims is None:  # not the analysed values: find the cores from scratch
                return fuse_tensor(theta0, models, **rule)
        else:
            base = base_buf[:m].copy_(base_flat[start:stop])
            _check_finite(base, "θ0")
            claims = find_claims(
                base, list(v), thresholds, scratch[:m], mask[:m], name=name, start=start
            )
        at, owner = owners(claims)
        chunk_cores.append((at, owner))
        if at.numel():
            # Zeroing hides these columns from the Gram check below: look at them first
            # (tasks were already checked through their Δ).
            for i in others:
                if not bool(torch.isfinite(v[i].index_select(0, at)).all()):
                    raise NonFiniteError("a model that is not a task holds NaN/Inf")
            v.index_fill_(1, at, 0.0)
        gram += gram_matrix(v)
    if not np.isfinite(gram).all():
        raise NonFiniteError("a model holds NaN/Inf (or the norms overflow)")
    coef = fold_coefficients(gram, fusion_base, omegas, epsilon).astype(np.float32).tolist()

    # Pass 2, chunk by chunk: the fold as one linear combination, then the core entries
    # copied bit for bit (while the chunk is still in the CPU's cache).
    result = torch.empty(total, dtype=models[fusion_base].dtype)
    folded = _WORKSPACE.take("folded", width, torch.float32)
    for (at, owner), start in zip(chunk_cores, starts, strict=True):
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
        out = result[start:stop]
        out.copy_(acc)
        if at.numel():
            for i, t in enumerate(thresholds):
                if t is not None:
                    mine = at[owner == i]
                    out.index_copy_(0, mine, flats[i][start:stop].index_select(0, mine))
    return result.reshape(theta0.shape)


def _split_positions(
    positions: Sequence[torch.Tensor | None], starts: range, total: int
) -> list[list[torch.Tensor | None]]:
    """Per chunk, per model: its core positions in that chunk, from the chunk's start."""
    edges = torch.tensor([*starts, total])
    cuts = [None if p is None else torch.searchsorted(p, edges).tolist() for p in positions]
    return [
        [
            None if p is None else p[cut[j] : cut[j + 1]] - start
            for p, cut in zip(positions, cuts, strict=True)
        ]
        for j, start in enumerate(starts)
    ]
