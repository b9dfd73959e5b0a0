"""Independent brute-force references: in-memory torch.topk cores, entry-by-entry fusion."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import torch


def brute_force(base, tasks, p, cast=None):
    """Reference cores: concatenate every |θi − θ0| in memory and take torch.topk.

    Args:
        base: {name: tensor} of θ0 (floating tensors only are used).
        tasks: list of {name: tensor}.
        p: core fraction.
        cast: optional dtype applied to inputs first (the recipe's dtype).

    Returns:
        (thresholds list[float], counts {name: [per task]}, intersections ndarray, k)
    """
    names = sorted(n for n, t in base.items() if t.is_floating_point())

    def prep(t):
        return (t.to(cast) if cast is not None else t).float().reshape(-1)

    total = sum(base[n].numel() for n in names)
    k = int(Decimal(repr(p)) * total)
    masks, thresholds = [], []
    for task in tasks:
        delta = torch.cat([(prep(task[n]) - prep(base[n])).abs() for n in names])
        t = float(torch.topk(delta, k).values[-1])
        thresholds.append(t)
        masks.append(delta >= t)
    sizes = [base[n].numel() for n in names]
    counts = {}
    for i, m in enumerate(masks):
        for n, part in zip(names, torch.split(m, sizes)):
            counts.setdefault(n, [0] * len(tasks))[i] = int(part.sum())
    inter = np.array([[int((a & b).sum()) for b in masks] for a in masks])
    return thresholds, counts, inter, k


def assert_plan_matches(plan, reference):
    thresholds, counts, inter, k = reference
    assert plan.k == k
    for i, task in enumerate(plan.tasks):
        # bit for bit: compare the float32 bit patterns
        ref = np.float32(thresholds[i]).view(np.uint32)
        got = np.float32(task.core_threshold).view(np.uint32)
        assert got == ref, (task.model, task.core_threshold, thresholds[i])
        assert task.core_count == inter[i, i]
        for name, per_task in counts.items():
            assert task.per_tensor[name] == per_task[i], (task.model, name)
    assert np.array_equal(np.array(plan.intersections), inter)


def ref_slerp(x, y, w, eps):
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return (1 - w) * x + w * y
    c = np.clip(np.dot(x, y) / (nx * ny), -1, 1)
    th = np.arccos(c)
    if th < eps or np.pi - th < eps:
        return (1 - w) * x + w * y
    return (np.sin((1 - w) * th) * x + np.sin(w * th) * y) / np.sin(th)


def ref_fuse(theta0, models, thresholds, omegas, fb, eps):
    """Entry by entry for the core, float64 for the fold."""
    t0 = theta0.float().numpy().reshape(-1)
    ms = [m.float().numpy().reshape(-1) for m in models]
    n = t0.size
    owner = np.full(n, -1)
    for j in range(n):
        best = None
        for i, (m, t) in enumerate(zip(ms, thresholds)):
            if t is None:
                continue
            d = np.float32(abs(np.float32(m[j]) - np.float32(t0[j])))
            if d >= t and (best is None or d > best):
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
