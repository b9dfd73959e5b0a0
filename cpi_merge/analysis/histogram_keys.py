"""Keys of the histogram strategy: the digits it narrows a boundary bucket by.

Each entry's key (:mod:`cpi_merge.analysis.core_rule`) has three levels: Δ's float32
bits, |θ0|'s bits reversed (smaller first), the tie hash reversed. A :class:`Bucket` is a
task's boundary bucket: the levels fixed so far and a prefix of the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cpi_merge.analysis.boundary import TensorLayout
from cpi_merge.analysis.core_rule import MAX_HASH
from cpi_merge.analysis.selection import DeltaChunk

WIDTHS = (31, 31, 53)
"""Bits of each key level: Δ bits, reversed |θ0| bits, reversed hash."""
STEPS = ((0, 16), (0, 15), (1, 16), (1, 15), (2, 18), (2, 18), (2, 17))
"""The digits, in order: (level, width)."""


@dataclass
class Bucket:
    """One task's boundary bucket: key levels fixed so far, the current level's prefix."""

    rank: int
    """1-based rank of the core's last entry inside the bucket."""
    levels: int
    """Key levels that may be narrowed (1 when every tie is taken: Δ only)."""
    fixed: list[int] = field(default_factory=list)
    prefix: int = 0
    bits: int = 0
    population: int = 0
    above: int = 0
    """Entries strictly better than the bucket."""
    above_threshold: int | None = None
    at_threshold: int | None = None
    """Entries with Δ > t and Δ == t, known once Δ's level is fixed."""

    def next_step(self) -> tuple[int, int] | None:
        """The next digit to narrow by, ``(level, width)``; None once the key is fixed."""
        done = sum(WIDTHS[: len(self.fixed)]) + self.bits
        for level, width in STEPS:
            if level >= self.levels:
                return None
            if done < width:
                return level, width
            done -= width
        return None


def key_level(level: int, chunk: DeltaChunk, task: int, at: torch.Tensor, layout) -> torch.Tensor:
    """Level ``level`` of the key (larger = better) of entries ``at`` of a chunk, int64."""
    if level == 0:
        return chunk.deltas[task][at].view(torch.int32).long()
    if level == 1:
        return 0x7FFFFFFF - chunk.base[at].abs().view(torch.int32).long()
    hashes = layout.layout.hashes(layout.seed, (at + chunk.offset).numpy())
    return torch.from_numpy((np.uint64(MAX_HASH) - hashes).astype(np.int64))


@dataclass(frozen=True)
class Keyed:
    """What the deeper key levels need: tensor layout (positions) and the tie seed."""

    layout: TensorLayout
    seed: int


def classify(
    chunk: DeltaChunk, task: int, bucket: Bucket, keyed: Keyed
) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool mask of the chunk's entries strictly above the bucket; positions inside it."""
    bits = chunk.deltas[task].view(torch.int32)
    if not bucket.fixed:  # Δ's level, partly resolved
        top = bits >> (WIDTHS[0] - bucket.bits)
        return top > bucket.prefix, (top == bucket.prefix).nonzero().squeeze(1)
    above = bits > bucket.fixed[0]
    at = (bits == bucket.fixed[0]).nonzero().squeeze(1)
    for level, value in enumerate(bucket.fixed[1:], 1):
        key = key_level(level, chunk, task, at, keyed)
        above[at[key > value]] = True
        at = at[key == value]
    if bucket.bits:
        level = len(bucket.fixed)
        top = key_level(level, chunk, task, at, keyed) >> (WIDTHS[level] - bucket.bits)
        above[at[top > bucket.prefix]] = True
        at = at[top == bucket.prefix]
    return above, at
