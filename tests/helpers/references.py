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
        masks [{name: bool tensor}], at_threshold and taken_at_threshold per task.
    """
    names = sorted(n for n, t in base.items() if t.is_floating_point())

    def prep(t):
        return (t.to(cast) if cast is not None else t).float().reshape(-1)

    sizes = [base[n].numel() for n in names]
    total = sum(sizes)
    k = int(Decimal(repr(p)) * total)
    base_abs = torch.cat([prep(base[n]).abs() for n in names]).numpy()
    hashes = np.concatenate([_hashes(seed, n, base[n].numel()) for n in names])
    masks, boundaries, ties, taken = [], [], [], []
    for task in tasks:
        delta = torch.cat([(prep(task[n]) - prep(base[n])).abs() for n in names]).numpy()
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
    return dict(
        boundaries=boundaries,
        counts=counts,
        intersections=inter,
        k=k,
        at_threshold=ties,
        taken_at_threshold=taken,
    )


def _bits(x: float) -> int:
    return int(np.float32(x).view(np.uint32))


def assert_plan_matches(plan, reference):
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
