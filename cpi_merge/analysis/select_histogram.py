"""The ``histogram`` strategy: exact cores in three passes of constant memory.

A radix select on the float32 bit pattern (:mod:`cpi_merge.analysis.radix`): pass 1
counts the upper 19 bits, pass 2 counts the lower 12 bits inside the bucket that holds
the k-th value, which gives the exact threshold; pass 3 counts core entries and
intersections. A few MB whatever the model size, for checkpoints where the ``buffer``
strategy would not fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from cpi_merge.analysis.core_rule import core_mask
from cpi_merge.analysis.radix import (
    HIGH_BUCKETS,
    LOW_BITS,
    LOW_BUCKETS,
    float32_from_bits,
    high_keys,
    top_bucket,
)
from cpi_merge.analysis.selection import CoreSelection, DeltaChunk, degenerate_task


def select_cores_histogram(
    open_stream: Callable[[], Iterable[DeltaChunk]],
    *,
    k: int,
    n_tensors: int,
    labels: Sequence[str],
    total: int,
) -> CoreSelection:
    """Exact cores in three passes of constant memory (radix select on float32 bits).

    Args:
        open_stream: Returns a fresh Δ stream each time it is called (three times).
        k: Entries per core before ties, ``floor(p · D)``; ``1 <= k <= total``.
        n_tensors: Number of tensors in the stream.
        labels: One name per task, used in error messages.
        total: D, the number of entries in the stream.

    Returns:
        The exact :class:`CoreSelection`.

    Raises:
        DegenerateTaskError: A task has fewer than k entries that differ from the base.

    """
    n = len(labels)
    high = [torch.zeros(HIGH_BUCKETS, dtype=torch.int64) for _ in range(n)]
    positive = [0] * n
    for chunk in open_stream():
        for i, delta in enumerate(chunk.deltas):
            high[i] += torch.bincount(high_keys(delta), minlength=HIGH_BUCKETS)
            positive[i] += int(torch.count_nonzero(delta))
    for i in range(n):
        if positive[i] < k:
            raise degenerate_task(labels[i], positive[i], k, total)

    buckets, ranks = [], []
    for i in range(n):
        bucket, above = top_bucket(high[i], k)
        buckets.append(bucket)
        ranks.append(k - above)  # rank of the k-th largest inside its bucket
    del high

    low = [torch.zeros(LOW_BUCKETS, dtype=torch.int64) for _ in range(n)]
    for chunk in open_stream():
        for i, delta in enumerate(chunk.deltas):
            inside = delta.view(torch.int32)[high_keys(delta) == buckets[i]] & (LOW_BUCKETS - 1)
            if inside.numel():
                low[i] += torch.bincount(inside, minlength=LOW_BUCKETS)
    thresholds = []
    for i in range(n):
        low_bits, _ = top_bucket(low[i], ranks[i])
        thresholds.append(float32_from_bits((buckets[i] << LOW_BITS) | low_bits))

    counts, intersections = count_cores(open_stream(), thresholds, n_tensors=n_tensors)
    return CoreSelection(tuple(thresholds), counts, intersections)


def count_cores(
    chunks: Iterable[DeltaChunk], thresholds: Sequence[float], *, n_tensors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Count core entries per tensor and pairwise core intersections for known thresholds.

    Args:
        chunks: The Δ stream.
        thresholds: ``t_i`` per task; entry j is in core i when ``Δi[j] >= t_i``.
        n_tensors: Number of tensors in the stream.

    Returns:
        ``(counts, intersections)`` as in :class:`CoreSelection`.

    """
    n = len(thresholds)
    counts = np.zeros((n, n_tensors), dtype=np.int64)
    intersections = np.zeros((n, n), dtype=np.int64)
    for chunk in chunks:
        masks = [core_mask(d, t) for d, t in zip(chunk.deltas, thresholds, strict=True)]
        for i in range(n):
            c = int(torch.count_nonzero(masks[i]))
            counts[i, chunk.tensor_index] += c
            intersections[i, i] += c
            for j in range(i + 1, n):
                both = int(torch.count_nonzero(masks[i] & masks[j]))
                intersections[i, j] += both
                intersections[j, i] += both
    return counts, intersections
