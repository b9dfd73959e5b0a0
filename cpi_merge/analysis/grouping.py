"""Stage 2: Jaccard similarity of core regions, task groups, and the stage order.

Groups are the connected components of the graph with an edge i–j when
``S(Ci, Cj) >= tau`` and the cores overlap at all (so ``tau = 0`` joins every pair with
any overlap, as the method's specification says, rather than every pair). Within a group, tasks keep
their recipe order. The stage order of the groups is either the recipe order (groups
ordered by their first task) or a seeded random permutation of it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import numpy as np

StageOrder = Literal["random", "given"]


def jaccard_matrix(intersections: np.ndarray) -> np.ndarray:
    """Exact Jaccard ``|Ci ∩ Cj| / |Ci ∪ Cj|`` from intersection counts.

    Args:
        intersections: Square int array; the diagonal holds ``|Ci|``.

    Returns:
        Float64 matrix. Two empty sets have Jaccard 0 (they share nothing); a non-empty
        set has Jaccard 1 with itself.

    """
    inter = np.asarray(intersections, dtype=np.int64)
    sizes = np.diag(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return result.astype(np.float64)


def group_tasks(jaccard: np.ndarray, tau: float) -> list[list[int]]:
    """Connected components of the overlap graph, in recipe order.

    Args:
        jaccard: Square Jaccard matrix.
        tau: Edge threshold; an edge needs ``S >= tau`` and ``S > 0``.

    Returns:
        Groups of task indices; each group sorted, groups ordered by their first task.

    """
    n = len(jaccard)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            s = float(jaccard[i][j])
            if s >= tau and s > 0:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def order_stages(groups: Sequence[list[int]], order: StageOrder, seed: int) -> list[list[int]]:
    """Put groups in stage order.

    Args:
        groups: Groups in recipe order.
        order: ``"given"`` keeps recipe order; ``"random"`` shuffles with ``seed``
            (the paper's evaluated setting).
        seed: Seed of the shuffle (Python's ``random.Random``, stable across platforms).

    Returns:
        A new list of groups in stage order.

    Raises:
        ValueError: Unknown ``order``.

    """
    staged = [list(g) for g in groups]
    if order == "given":
        return staged
    if order == "random":
        random.Random(seed).shuffle(staged)
        return staged
    raise ValueError(f"stage order {order!r} is not one of 'random', 'given'")
