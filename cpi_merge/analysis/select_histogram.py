"""The ``histogram`` strategy: exact cores in two passes (usually) of bounded memory.

A radix select on each entry's whole key (:mod:`cpi_merge.analysis.core_rule`): Δ's
float32 bits, then |θ0|'s (reversed: smaller first), then the tie hash (reversed). Pass
1 counts the upper 16 bits of Δ, which finds each core's *boundary bucket*: the entries
whose key starts like the core's last entry's; near a sample's estimate of the boundary
it also counts the next digits (:mod:`.histogram_first_pass`), which usually narrows the
bucket to one exact Δ, and at a frequent bf16 tie value to one |θ0| range too. When the
buckets' entries fit in
``memory_budget`` (the usual case), pass 2 keeps them and counts everything above them
(core sizes per tensor, pairwise overlaps); the boundaries are then resolved in memory.
When they do not fit (millions of bf16 ties at one value of a 70B model), each further
pass narrows the buckets by the next digits of the key until they do. Memory: a few MB
of histograms per task plus at most the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from cpi_merge.analysis.boundary import TensorLayout
from cpi_merge.analysis.histogram_final import KEPT_BYTES, count_every_tie, keep_and_resolve
from cpi_merge.analysis.histogram_first_pass import first_pass, narrow_bucket, plan_windows
from cpi_merge.analysis.histogram_keys import WIDTHS, Bucket, Keyed, classify, key_level
from cpi_merge.analysis.selection import CoreSelection, DeltaChunk

LOG = logging.getLogger(__name__)
MAX_TASKS = 63


def _narrow(chunks, buckets: list[Bucket], keyed: Keyed) -> None:
    """One more pass: histogram the next digit inside every bucket, then narrow the buckets."""
    steps = [b.next_step() for b in buckets]
    hists = [None if s is None else torch.zeros(1 << s[1], dtype=torch.int64) for s in steps]
    for chunk in chunks:
        for i, (bucket, step) in enumerate(zip(buckets, steps, strict=True)):
            if step is None:
                continue
            level, width = step
            inside = classify(chunk, i, bucket, keyed)[1]
            key = key_level(level, chunk, i, inside, keyed)
            shift = WIDTHS[level] - bucket.bits - width
            hists[i] += torch.bincount((key >> shift) & ((1 << width) - 1), minlength=1 << width)
    for bucket, hist, step in zip(buckets, hists, steps, strict=True):
        if step is not None:
            narrow_bucket(bucket, hist, *step)


def select_cores_histogram(
    open_stream: Callable[[str], Iterable[DeltaChunk]],
    *,
    k: int,
    layout: TensorLayout,
    labels: Sequence[str],
    total: int,
    memory_budget: int,
    exact_k: bool = True,
    seed: int = 0,
    samples: Sequence[torch.Tensor] | None = None,
) -> CoreSelection:
    """Exact cores by radix selection on the whole key, keeping at most ``memory_budget``.

    Args:
        open_stream: Returns a fresh Δ stream (with θ0) each time it is called; its
            argument labels the pass for the progress bar.
        k: Entries per core, ``floor(p · D)``; ``1 <= k <= total``.
        layout: Tensor names and global offsets.
        labels: One name per task, used in error messages.
        total: D, the number of entries in the stream.
        memory_budget: Bytes the kept bucket entries of all tasks may take.
        exact_k: Exactly k entries by the tie rule (else every entry at the threshold).
        seed: Seed of the tie hash.
        samples: Per task, Δ at a few sampled positions
            (:meth:`~cpi_merge.analysis.delta_stream.DeltaStream.sample`): the first pass
            then also narrows the buckets near the sample's estimate of each boundary
            (:mod:`.histogram_first_pass`), so that it is usually followed by the last.
            Exact with or without, whatever the sample.

    Returns:
        The exact :class:`CoreSelection` (no positions).

    Raises:
        DegenerateTaskError: A task has fewer than k entries that differ from the base.
        ValueError: More than 63 tasks.
    """
    n = len(labels)
    if n > MAX_TASKS:
        raise ValueError(f"the histogram strategy handles at most {MAX_TASKS} tasks; got {n}")
    keyed = Keyed(layout, seed)
    buckets = [Bucket(rank=k, levels=3 if exact_k else 1) for _ in range(n)]
    windows = plan_windows(samples, k=k, total=total) if samples else [None] * n
    first_pass(open_stream("pass 1: key histogram"), buckets, keyed, windows, labels, k, total)
    passes = 1
    while any(b.next_step() is not None for b in buckets):
        if sum(b.population for b in buckets) * KEPT_BYTES <= memory_budget:
            break
        passes += 1
        _narrow(open_stream(f"pass {passes}: key histogram"), buckets, keyed)
    passes += 1
    kept = sum(b.population for b in buckets)
    LOG.info(
        "histogram strategy: %d passes over the checkpoints; the last keeps %s boundary "
        "entries (%.1f MB of the %.1f MB budget)",
        passes,
        f"{kept:,}",
        kept * KEPT_BYTES / 1e6,
        memory_budget / 1e6,
    )
    final = open_stream(f"pass {passes}: cores and overlaps")
    if all(b.next_step() is None for b in buckets) and not exact_k:
        return count_every_tie(final, buckets, n, len(layout.offsets), seed)
    return keep_and_resolve(final, buckets, keyed, n, exact_k)
