"""Starting cuts for the ``buffer`` selection, guessed from a small sample of Δ.

The buffer keeps every entry at or above its cut; starting at 0 it takes every changed
entry and prunes repeatedly. A cut that about ``headroom · k`` entries reach lets few
entries below the final threshold in. It only has to be a good guess: the selection is
exact whatever the cut (one that fewer than k entries reach is detected and the
selection redone from 0, see :class:`cpi_merge.analysis.select_buffer.CutTooHighError`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cpi_merge.analysis.radix import kth_largest


def estimate_cuts(
    samples: Sequence[torch.Tensor], *, k: int, total: int, headroom: float = 1.5
) -> list[float]:
    """Starting cuts for :func:`~cpi_merge.analysis.select_buffer.select_cores_buffer`.

    The cut is the sample's value at rank ``headroom · k · len(sample) / total``: about
    ``headroom · k`` entries of the whole stream should reach it.

    Args:
        samples: Per task, |Δ| at sampled positions (float32, finite or not).
        k: Entries per core.
        total: Entries in the whole stream.
        headroom: How many times k entries the cut should let through.

    Returns:
        One cut per task; 0.0 (no cut) where the sample is too small to tell.
    """
    cuts = []
    for sample in samples:
        rank = math.ceil(headroom * k * sample.numel() / max(total, 1))
        finite = bool(torch.isfinite(sample).all())
        if rank < 64 or not finite or int(torch.count_nonzero(sample)) < rank:
            cuts.append(0.0)
        else:
            cuts.append(kth_largest(sample, rank))
    return cuts
