"""What the exact core selection consumes and produces (shared by both strategies).

The selection only sees float32 chunks of ``Δi = |θi − θ0|`` (:class:`DeltaChunk`, made by
:mod:`cpi_merge.analysis.delta_stream`) and returns a :class:`CoreSelection`. Entries with
Δ = 0 never enter a core: a threshold of 0 would make the core the whole model, which
is reported as a :class:`~cpi_merge.errors.DegenerateTaskError` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cpi_merge.analysis.core_rule import CoreBoundary
from cpi_merge.errors import DegenerateTaskError


@dataclass(frozen=True)
class DeltaChunk:
    """A contiguous run of entries of one tensor, with |θi − θ0| for every task.

    Attributes:
        tensor_index: Position of the tensor in the tensor list of the stream.
        offset: Global flat index of the chunk's first entry (tensors laid end to end).
        deltas: One 1-D float32 tensor per task, all of the same length. They may be
            views of reused buffers: valid only until the next chunk is requested.
        base: θ0 at the same entries, float32 (same validity), for the tie rule.
        tasks: θi per task at the same entries (same validity; any float dtype, as
            loaded): the signs of the updates, read only where they are needed.

    """

    tensor_index: int
    offset: int
    deltas: tuple[torch.Tensor, ...]
    base: torch.Tensor | None = None
    tasks: tuple[torch.Tensor, ...] | None = None

    def negative(self, task: int, at: torch.Tensor) -> torch.Tensor:
        """Where ``θi − θ0 < 0`` at positions ``at`` of the chunk (bool)."""
        if self.tasks is None or self.base is None:
            raise ValueError("this chunk carries no task values: signs are unknown")
        return self.tasks[task][at].float() < self.base[at]


@dataclass(frozen=True)
class CoreSelection:
    """Exact core regions, summarised.

    Attributes:
        boundaries: Per task, the key of its core's k-th entry (``t_i`` and the tie rule).
        counts: int64 array (tasks × tensors): core entries of task i in tensor j.
        intersections: int64 array (tasks × tasks): ``|Ci ∩ Cj|``; the diagonal is ``|Ci|``.
        at_threshold: Per task, entries with Δ == t_i.
        taken_at_threshold: Per task, how many of those are in the core.
        core_energy: Per task, ``Σ Δ²`` over its core.
        sign_conflicts: int64 array (tasks × tasks): entries of ``Ci ∩ Cj`` where the two
            updates have opposite signs.
        positions: Per task, the sorted global indices of its core entries, when the
            strategy holds them at the end (``buffer``); else None.

    """

    boundaries: tuple[CoreBoundary, ...]
    counts: np.ndarray
    intersections: np.ndarray
    at_threshold: tuple[int, ...]
    taken_at_threshold: tuple[int, ...]
    core_energy: tuple[float, ...]
    sign_conflicts: np.ndarray
    positions: tuple[np.ndarray, ...] | None = None

    @property
    def thresholds(self) -> tuple[float, ...]:
        """``t_i`` per task: the k-th largest Δi, a float32 value held exactly."""
        return tuple(b.threshold for b in self.boundaries)

    @property
    def core_counts(self) -> tuple[int, ...]:
        """``|Ci|`` per task (k with the tie rule; more when every tie is taken)."""
        return tuple(int(x) for x in np.diag(self.intersections))


def sorted_intersection(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where two sorted arrays of distinct integers share values: (indices in a, in b)."""
    if a.size == 0 or b.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    pos = np.searchsorted(a, b)
    pos[pos == a.size] = a.size - 1
    hit = a[pos] == b
    return pos[hit], np.flatnonzero(hit)


def degenerate_task(label: str, changed: int, k: int, total: int) -> DegenerateTaskError:
    """The error for a task with fewer than k changed entries (its core would be everything)."""
    return DegenerateTaskError(
        f"task {label!r}: only {changed:,} of {total:,} entries differ from the base, fewer "
        f"than k = {k:,} (core_fraction × total entries). Its core threshold would be 0, so "
        "its core would be the whole model. Check that this checkpoint really is a "
        "fine-tune of base_model, or lower core_fraction below "
        f"{changed / total:.3g}."
    )
