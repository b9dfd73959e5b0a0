"""The SLERP fold of the non-core entries as one linear combination (Stage 3, step 2).

Every fold step ``x ← SLERP(x, θi, ωi)`` is a linear combination, so the folded vector
is ``Σ c_m θm`` over the models' non-core vectors: the coefficients follow exactly from
the Gram matrix of those vectors (float32 products summed in blocks of 1024, blocks
summed in float64: relative error ~1e-8). SLERP's defined results (never NaN): when
either vector has zero norm, or the angle between them is below ``epsilon`` or above
``π − epsilon``, the fold is the linear interpolation ``(1 − ω)·x + ω·y``. A folded
vector whose squared norm falls below 1e-12 of the largest input's counts as zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

GRAM_BLOCK = 1024
ZERO_NORM = 1e-12


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
        linear = xx <= ZERO_NORM * scale or yy <= ZERO_NORM * scale
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


def gram_matrix(rows: torch.Tensor) -> np.ndarray:
    """float64 Gram matrix of float32 rows: float32 block products, float64 sum of blocks."""
    n_rows, length = rows.shape
    whole = length - length % GRAM_BLOCK
    gram = np.zeros((n_rows, n_rows))
    if whole:
        blocks = rows[:, :whole].reshape(n_rows, -1, GRAM_BLOCK).transpose(0, 1)
        gram += torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(0).numpy()
    if whole < length:
        tail = rows[:, whole:].double()
        gram += (tail @ tail.T).numpy()
    return gram
