"""Independent brute-force references: whole-key sorted cores, entry-by-entry fusion.

Nothing here calls the product's selection or fusion code: cores come from sorting every
entry of the whole model by its key (Δ larger first, |θ0| smaller first, then the seeded
hash, computed here in plain Python), the fusion entry by entry in float64.
"""

from __future__ import annotations

import hashlib
import math
from decimal import Decimal

import numpy as np
import pytest
import torch

_M64 = (1 << 64) - 1


def ref_hash(seed: int, name: str, position: int) -> int:
    """The tie hash, written independently: splitmix64's finaliser on (key + position)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little")
    x = (position + key) & _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return x >> 11


def _hashes(seed, name, n):
    return np.array([ref_hash(seed, name, j) for j in range(n)], dtype=np.float64)


def brute_force(base, tasks, p, cast=None, *, exact_k=True, seed=0):
    """Reference cores: every entry of the model sorted by its whole key; the first k.

    Args:
        base: {name: tensor} of θ0 (floating tensors only are used).
        tasks: list of {name: tensor}.
        p: core fraction.
        cast: optional dtype applied to inputs first (the recipe's dtype).
        exact_k: False: every entry at the k-th largest Δ is in the core.
        seed: the tie hash's seed.

    Returns:
        dict with boundaries [(t, a, h)], counts {name: [per task]}, intersections, k,
        masks [{name: flat bool tensor}] per task, at_threshold and taken_at_threshold per task.
    """
    names = sorted(n for n, t in base.items() if t.is_floating_point())

    def prep(t):
        return (t.to(cast) if cast is not None else t).float().reshape(-1)

    sizes = [base[n].numel() for n in names]
    total = sum(sizes)
    k = int(Decimal(repr(p)) * total)
    base_abs = torch.cat([prep(base[n]).abs() for n in names]).numpy()
    hashes = np.concatenate([_hashes(seed, n, base[n].numel()) for n in names])
    masks, boundaries, ties, taken, signed_all = [], [], [], [], []
    for task in tasks:
        signed = torch.cat([prep(task[n]) - prep(base[n]) for n in names]).numpy()
        signed_all.append(signed.astype(np.float64))
        delta = np.abs(signed)
        order = np.lexsort((hashes, base_abs, -delta.astype(np.float64)))
        last = order[k - 1]
        t = delta[last]
        core = np.zeros(total, dtype=bool)
        if exact_k:
            core[order[:k]] = True
            boundaries.append((float(t), float(base_abs[last]), int(hashes[last])))
        else:
            core = delta >= t
            boundaries.append((float(t), math.inf, (1 << 53) - 1))
        masks.append(torch.from_numpy(core))
        ties.append(int((delta == t).sum()))
        taken.append(int((core & (delta == t)).sum()))
    counts = {}
    for i, m in enumerate(masks):
        for n, part in zip(names, torch.split(m, sizes)):
            counts.setdefault(n, [0] * len(tasks))[i] = int(part.sum())
    inter = np.array([[int((a & b).sum()) for b in masks] for a in masks])
    base_norm = float(np.sqrt((base_abs.astype(np.float64) ** 2).sum()))
    norms = [float(np.sqrt((s**2).sum())) for s in signed_all]
    cosine = [
        [float(a @ b) / (na * nb) for b, nb in zip(signed_all, norms)]
        for a, na in zip(signed_all, norms)
    ]
    conflicts = [
        [
            int((ma & mb).numpy().__and__(np.sign(a) != np.sign(b)).sum()) / int((ma & mb).sum())
            if i != j and int((ma & mb).sum())
            else None
            for j, (mb, b) in enumerate(zip(masks, signed_all))
        ]
        for i, (ma, a) in enumerate(zip(masks, signed_all))
    ]
    return dict(
        boundaries=boundaries,
        masks=[dict(zip(names, torch.split(m, sizes))) for m in masks],
        counts=counts,
        intersections=inter,
        k=k,
        at_threshold=ties,
        taken_at_threshold=taken,
        relative_norms=[n / base_norm for n in norms],
        energy_share=[
            float((s[m.numpy()] ** 2).sum() / (s**2).sum()) for s, m in zip(signed_all, masks)
        ],
        sorted_energy=[np.cumsum(np.sort(s**2)[::-1]) / (s**2).sum() for s in signed_all],
        p_holding=[_p_holding(np.abs(s).astype(np.float32), total) for s in signed_all],
        cosine=cosine,
        conflicts=conflicts,
    )


def _bits(x: float) -> int:
    return int(np.float32(x).view(np.uint32))


def _p_holding(delta, total):
    """Smallest share of entries, cut at a 16-bit float32 bucket edge, holding 50%/90%."""
    keys = delta.view(np.int32) >> 16
    sq = delta.astype(np.float64) ** 2
    out = {}
    for share in (0.5, 0.9):
        for edge in sorted(set(keys.tolist()), reverse=True):
            above = keys >= edge
            if sq[above].sum() >= share * sq.sum() * (1 - 1e-12):
                out[f"{share:g}"] = int(above.sum()) / total
                break
    return out


def assert_plan_matches(plan, reference):
    """The plan equals the brute force (curves: exact, or from a sample of every entry)."""
    """Thresholds, tie numbers, counts and overlaps equal the reference bit for bit."""
    assert plan.k == reference["k"]
    for i, task in enumerate(plan.tasks):
        t, a, h = reference["boundaries"][i]
        b = task.boundary(plan.tie_seed)
        assert _bits(b.threshold) == _bits(t), (task.name, b.threshold, t)
        assert b.tie_base_abs == float(np.float32(a)) and b.tie_hash == h, (task.name, b)
        assert task.core_count == reference["intersections"][i, i]
        assert task.at_threshold == reference["at_threshold"][i]
        assert task.taken_at_threshold == reference["taken_at_threshold"][i]
        for name, per_task in reference["counts"].items():
            assert task.per_tensor[name] == per_task[i], (task.name, name)
    assert np.array_equal(np.array(plan.intersections), reference["intersections"])
    if plan.task_cosine is None:
        return
    close = dict(rel=1e-5, abs=1e-9)
    for i, task in enumerate(plan.tasks):
        assert task.relative_update_norm == pytest.approx(reference["relative_norms"][i], **close)
        assert task.core_energy_share == pytest.approx(reference["energy_share"][i], **close)
        if plan.energy_curve_sample is not None:
            continue  # an estimate from a sample: see test_starting_cuts_never_change_...
        ranked = reference["sorted_energy"][i]
        for share_of_entries, share_of_energy in task.energy_curve or []:  # exact points
            n = round(share_of_entries * plan.total_parameters)
            assert share_of_energy == pytest.approx(ranked[n - 1], **close)
        assert task.p_holding == pytest.approx(reference["p_holding"][i], **close)
    assert np.allclose(plan.task_cosine, reference["cosine"], rtol=1e-5, atol=1e-7)
    for row, ref_row in zip(plan.sign_conflict_rate, reference["conflicts"]):
        for got, want in zip(row, ref_row):
            assert (got is None) == (want is None) and (got is None or abs(got - want) < 1e-12)


def ref_slerp(x, y, w, eps):
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return (1 - w) * x + w * y
    c = np.clip(np.dot(x, y) / (nx * ny), -1, 1)
    th = np.arccos(c)
    if th < eps or np.pi - th < eps:
        return (1 - w) * x + w * y
    return (np.sin((1 - w) * th) * x + np.sin(w * th) * y) / np.sin(th)


def _rule(b):
    """(t, a, h, seed) of a boundary: a CoreBoundary, a bare threshold, or None."""
    if b is None or isinstance(b, int | float):
        return b if b is None else (np.float32(b), math.inf, (1 << 53) - 1, 0)
    return (np.float32(b.threshold), b.tie_base_abs, b.tie_hash, b.seed)


def _inside(rule, theta0_j, model_j, name, j):
    t, a, h, seed = rule
    d = np.float32(abs(np.float32(model_j) - np.float32(theta0_j)))
    b = abs(np.float32(theta0_j))
    return d, d > t or (d == t and (b < a or (b == a and ref_hash(seed, name, j) <= h)))


def ref_core(theta0, model, boundary, name=""):
    """Flat positions of one task's core in one tensor, entry by entry."""
    t0 = theta0.float().numpy().reshape(-1)
    m = model.float().numpy().reshape(-1)
    rule = _rule(boundary)
    return [j for j in range(t0.size) if _inside(rule, t0[j], m[j], name, j)[1]]


def ref_fuse(theta0, models, boundaries, omegas, fb, eps, name=""):
    """Entry by entry for the core (the whole rule), float64 for the fold."""
    t0 = theta0.float().numpy().reshape(-1)
    ms = [m.float().numpy().reshape(-1) for m in models]
    rules = [_rule(b) for b in boundaries]
    n = t0.size
    owner = np.full(n, -1)
    for j in range(n):
        best = None
        for i, (m, rule) in enumerate(zip(ms, rules)):
            if rule is None:
                continue
            d, inside = _inside(rule, t0[j], m[j], name, j)
            if inside and (best is None or d > best):
                best, owner[j] = d, i
    out = ms[fb].astype(np.float64).copy()
    for j in range(n):
        if owner[j] >= 0:
            out[j] = ms[owner[j]][j]
    rest = owner < 0
    x = ms[fb][rest].astype(np.float64)
    for i, m in enumerate(ms):
        if i != fb:
            x = ref_slerp(x, m[rest].astype(np.float64), omegas[i], eps)
    out[rest] = x
    return owner.reshape(theta0.shape), out.reshape(theta0.shape)
