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

from cpi_merge.errors import DegenerateTaskError


@dataclass(frozen=True)
class DeltaChunk:
    """A contiguous run of entries of one tensor, with |θi − θ0| for every task.

    Attributes:
        tensor_index: Position of the tensor in the tensor list of the stream.
        offset: Global flat index of the chunk's first entry (tensors laid end to end).
        deltas: One 1-D float32 tensor per task, all of the same length. They may be
            views of reused buffers: valid only until the next chunk is requested.

    """

    tensor_index: int
    offset: int
    deltas: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CoreSelection:
    """Exact core regions, summarised.

    Attributes:
        thresholds: ``t_i`` per task: the k-th largest Δi, a float32 value held exactly.
        counts: int64 array (tasks × tensors): core entries of task i in tensor j.
        intersections: int64 array (tasks × tasks): ``|Ci ∩ Cj|``; the diagonal is ``|Ci|``.
        positions: Per task, the sorted global indices of its core entries, when the
            strategy holds them at the end (``buffer``); else None.

    """

    thresholds: tuple[float, ...]
    counts: np.ndarray
    intersections: np.ndarray
    positions: tuple[np.ndarray, ...] | None = None

    @property
    def core_counts(self) -> tuple[int, ...]:
        """``|Ci|`` per task (at least k; larger when entries tie at the threshold)."""
        return tuple(int(x) for x in np.diag(self.intersections))


def degenerate_task(label: str, changed: int, k: int, total: int) -> DegenerateTaskError:
    """The error for a task with fewer than k changed entries (its core would be everything)."""
    return DegenerateTaskError(
        f"task {label!r}: only {changed:,} of {total:,} entries differ from the base, fewer "
        f"than k = {k:,} (core_fraction × total entries). Its core threshold would be 0, so "
        "its core would be the whole model. Check that this checkpoint really is a "
        "fine-tune of base_model, or lower core_fraction below "
        f"{changed / total:.3g}."
    )
