"""Positions of the entries of a chunk that pass a cut, found fast when they are few.

Scanning a chunk of 2^20 float32 |Δ| values for the ~1% at or above a cut, torch on
the CPU spent 0.29 ms on the comparison and 0.53 ms listing the positions, against
0.06 ms and ~0.18 ms here (numpy's comparison, then the listing below; benchmark
machine, 2 threads). The listing reads the mask 8 entries at a time as one 64-bit word,
lists the words that are not zero, then the entries inside those words only.
"""

from __future__ import annotations

import numpy as np
import torch

_DENSE = 8
"""Above one word in this many holding a True entry, list the whole mask directly."""


def true_positions(mask: np.ndarray) -> np.ndarray:
    """Ascending int64 positions of the True entries of a 1-D bool array.

    Args:
        mask: Contiguous, 1-D, ``bool``.

    Returns:
        The same as ``np.flatnonzero(mask)`` (int64).
    """
    whole = mask.size - mask.size % 8
    words = mask[:whole].view(np.uint64)
    busy = np.flatnonzero(words != 0)
    if busy.size * _DENSE > words.size:
        return np.flatnonzero(mask).astype(np.int64, copy=False)
    inside = np.flatnonzero(words[busy].view(np.bool_))
    found = busy[inside >> 3] * 8 + (inside & 7)
    if whole < mask.size:
        found = np.concatenate([found, np.flatnonzero(mask[whole:]) + whole])
    return found.astype(np.int64, copy=False)


def positions_at_least(values: torch.Tensor, cut: float) -> torch.Tensor:
    """Ascending positions where ``values >= cut`` (``> 0`` when ``cut`` is 0).

    Args:
        values: 1-D contiguous float32 on the CPU (|Δ|: NaN never passes).
        cut: A float32 value (held exactly), >= 0; 0 asks for the non-zero entries.

    Returns:
        int64 positions, the same as ``(values >= cut).nonzero()`` (``> 0`` for 0).

    Raises:
        ValueError: ``cut`` is negative or NaN.
    """
    if not cut >= 0:
        raise ValueError(f"a cut is a |Δ| value, >= 0; got {cut!r}")
    array = values.numpy()
    threshold = np.float32(cut)
    mask = array > threshold if cut == 0 else array >= threshold
    return torch.from_numpy(true_positions(mask))
