"""The one definition of core membership, used by the analysis, the fusion and consolidation.

Entry j is in task i's core when ``Δi[j] = |θi[j] − θ0[j]| >= t_i``, with Δ computed in
float32 from the values the merge sees (after the recipe's ``dtype`` cast) and ``t_i``
the exact k-th largest Δi over the whole model (a float32 value). Everything that needs
to know whether an entry is in a core (the selection's counts, the merge method's
claims, the freezer's positions) asks this module, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def as_float32(threshold: float) -> float:
    """Δ is float32, so ``Δ >= t`` means ``Δ >= float32(t)``: round a threshold once.

    (The analysis's thresholds already are float32 values; a hand-written 0.01 is not.)
    """
    return float(np.float32(threshold))


def thresholds_as_float32(thresholds: Sequence[float | None]) -> list[float | None]:
    """:func:`as_float32` for each threshold (``None``, a model that is not a task, stays)."""
    return [None if t is None else as_float32(t) for t in thresholds]


def core_mask(
    delta: torch.Tensor, threshold: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Which entries of a float32 Δ chunk are in the core of threshold ``threshold``.

    Args:
        delta: ``|θi − θ0|`` in float32.
        threshold: ``t_i`` (a float32 value).
        out: Optional bool buffer of ``delta``'s size.

    Returns:
        A bool tensor shaped like ``delta``.
    """
    return torch.ge(delta, threshold, out=out) if out is not None else delta >= threshold


def may_hold_core(largest_delta: float, threshold: float) -> bool:
    """Whether a chunk whose largest Δ is ``largest_delta`` can hold any core entry."""
    return largest_delta >= threshold
