"""The histogram strategy's first pass, guided by a sample of Δ: usually the last but one.

The first pass counts the upper 16 bits of every entry's Δ (the key's first digit). With
a sample of Δ it also looks closer at the few entries near the sample's estimate of each
core's boundary, at almost no cost, so that the boundary bucket left for the final pass
is small even under bf16 ties (millions of entries sharing one exact Δ):

- entries whose first digit lies in a *window* of at most :data:`WINDOW_DIGITS` digits
  around the estimate: a histogram of Δ's lower 15 bits (the exact threshold ``t``);
- those of them whose Δ equals one of the sample's most frequent values near the
  estimate (:data:`TIE_CANDIDATES` values): a histogram of the upper 16 bits of the tie
  rule's next key (|θ0|, smaller first), per value.

When the boundary lies in the window (the usual case), the pass narrows each bucket by
those digits too: its entries then share Δ and, at a frequent tie value, |θ0|'s upper
bits. When it does not, the bucket is narrowed by the first digit only, exactly as
without a sample; the result is exact either way (only the number of passes differs).
Extra memory: per task, ``WINDOW_DIGITS · 2^15 + TIE_CANDIDATES · 2^16`` int64 counts
(6 MiB).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from cpi_merge.analysis.histogram_keys import WIDTHS, Bucket, Keyed, key_level
from cpi_merge.analysis.radix import top_bucket
from cpi_merge.analysis.selection import DeltaChunk, degenerate_task

FIRST_WIDTH = 16
"""Bits of the first digit (Δ's upper bits)."""
LOW_WIDTH = WIDTHS[0] - FIRST_WIDTH
"""Bits of Δ below the first digit."""
BASE_WIDTH = 16
"""Upper bits of the |θ0| key counted at the tie candidates."""
WINDOW_DIGITS = 32
TIE_CANDIDATES = 8
BAND = (0.8, 1.25)
"""Sample ranks, as multiples of the expected rank of the k-th entry, that the window covers."""


@dataclass(frozen=True)
class Window:
    """Where the first pass looks closer for one task.

    Attributes:
        first: The smallest first digit in the window (at least 1: Δ = 0 is never a core).
        size: Number of digits, at most :data:`WINDOW_DIGITS`.
        candidates: Sorted int32 bit patterns of frequent exact Δ values near the estimate.
    """

    first: int
    size: int
    candidates: torch.Tensor


def plan_windows(samples: Sequence[torch.Tensor], *, k: int, total: int) -> list[Window | None]:
    """A window per task from its sample of Δ (None where the sample cannot tell).

    Args:
        samples: Per task, Δ at sampled positions (float32).
        k: Entries per core.
        total: Entries in the whole stream.
    """
    windows: list[Window | None] = []
    for sample in samples:
        windows.append(_window(sample, k, total))
    return windows


def _window(sample: torch.Tensor, k: int, total: int) -> Window | None:
    n = sample.numel()
    if n == 0 or not bool(torch.isfinite(sample).all()):
        return None
    rank = k * n / max(total, 1)
    changed = int(torch.count_nonzero(sample))
    low = max(1, math.floor(BAND[0] * rank))
    high = min(changed, max(low, math.ceil(BAND[1] * rank)))
    if high < low:
        return None
    top = torch.topk(sample, high).values  # descending
    bits = top.view(torch.int32)
    digits = bits >> LOW_WIDTH
    centre = int(digits[min(high, max(1, round(rank))) - 1])
    first, last = int(digits[high - 1]), int(digits[low - 1])
    if last - first + 1 > WINDOW_DIGITS:
        first = max(first, centre - WINDOW_DIGITS // 2)
        last = min(last, first + WINDOW_DIGITS - 1)
    first = max(first, 1)
    if last < first:
        return None
    band = bits[low - 1 : high]
    band = band[(band >> LOW_WIDTH >= first) & (band >> LOW_WIDTH <= last)]
    values, counts = torch.unique(band, return_counts=True)
    frequent = values[counts >= 2]
    if frequent.numel() > TIE_CANDIDATES:
        frequent = values[torch.topk(counts, TIE_CANDIDATES).indices]
    return Window(first, last - first + 1, torch.sort(frequent).values)


def narrow_bucket(bucket: Bucket, hist: torch.Tensor, level: int, width: int) -> None:
    """Narrow ``bucket`` by one digit (``level``, ``width``) given that digit's histogram."""
    digit, above = top_bucket(hist, bucket.rank)
    bucket.above += above
    bucket.rank -= above
    bucket.population = int(hist[digit])
    bucket.prefix = (bucket.prefix << width) | digit
    bucket.bits += width
    if bucket.bits == WIDTHS[level]:
        bucket.fixed.append(bucket.prefix)
        bucket.prefix = bucket.bits = 0
        if level == 0:
            bucket.above_threshold, bucket.at_threshold = bucket.above, bucket.population


class _Counts:
    """One task's first-pass histograms."""

    def __init__(self, window: Window | None):
        self.window = window
        self.first = torch.zeros(1 << FIRST_WIDTH, dtype=torch.int64)
        self.zeros = 0
        self.low = self.ties = None
        if window is not None:
            self.low = torch.zeros(window.size << LOW_WIDTH, dtype=torch.int64)
            self.ties = torch.zeros(window.candidates.numel() << BASE_WIDTH, dtype=torch.int64)

    def add(self, chunk: DeltaChunk, task: int, keyed: Keyed) -> None:
        bits = chunk.deltas[task].view(torch.int32)
        self.zeros += bits.numel() - int(torch.count_nonzero(bits))
        digits = bits >> LOW_WIDTH
        self.first += torch.bincount(digits, minlength=1 << FIRST_WIDTH)
        window = self.window
        if window is None:
            return
        inside = ((digits >= window.first) & (digits < window.first + window.size)).nonzero()
        inside = inside.squeeze(1)
        if inside.numel() == 0:
            return
        near = bits[inside]
        local = ((near >> LOW_WIDTH) - window.first) << LOW_WIDTH | (near & ((1 << LOW_WIDTH) - 1))
        self.low += torch.bincount(local, minlength=self.low.numel())
        candidates = window.candidates
        if candidates.numel() == 0:
            return
        which = torch.searchsorted(candidates, near).clamp_(max=candidates.numel() - 1)
        hit = candidates[which] == near
        if not bool(hit.any()):
            return
        base_key = key_level(1, chunk, task, inside[hit], keyed) >> (WIDTHS[1] - BASE_WIDTH)
        self.ties += torch.bincount(
            (which[hit].long() << BASE_WIDTH) | base_key, minlength=self.ties.numel()
        )

    def narrow(self, bucket: Bucket, label: str, k: int, total: int) -> None:
        """Narrow a fresh bucket by every digit this pass counted for it."""
        self.first[0] -= self.zeros  # Δ = 0 never enters a core
        if int(self.first.sum()) < k:
            raise degenerate_task(label, int(self.first.sum()), k, total)
        narrow_bucket(bucket, self.first, 0, FIRST_WIDTH)
        window = self.window
        if window is None or self.low is None or self.ties is None:
            return
        offset = bucket.prefix - window.first
        if not 0 <= offset < window.size or bucket.next_step() != (0, LOW_WIDTH):
            return
        narrow_bucket(bucket, self.low.view(window.size, -1)[offset], 0, LOW_WIDTH)
        if bucket.next_step() != (1, BASE_WIDTH):  # every tie taken: Δ alone is the key
            return
        match = (window.candidates == bucket.fixed[0]).nonzero()
        if match.numel():
            ties = self.ties.view(window.candidates.numel(), -1)[int(match[0, 0])]
            narrow_bucket(bucket, ties, 1, BASE_WIDTH)


def first_pass(
    chunks: Iterable[DeltaChunk],
    buckets: list[Bucket],
    keyed: Keyed,
    windows: Sequence[Window | None],
    labels: Sequence[str],
    k: int,
    total: int,
) -> None:
    """Count the first digit (and the windows' closer digits), then narrow every bucket.

    Raises:
        DegenerateTaskError: A task has fewer than k entries that differ from the base.
    """
    counts = [_Counts(w) for w in windows]
    for chunk in chunks:
        for task, tally in enumerate(counts):
            tally.add(chunk, task, keyed)
    for bucket, tally, label in zip(buckets, counts, labels, strict=True):
        tally.narrow(bucket, label, k, total)
