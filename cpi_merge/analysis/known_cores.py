"""Core positions found by an in-process analysis, per tensor, for the merge method.

The analysis (buffer strategy) ends holding every task's exact core as sorted global
flat indices. Without them, the merge method finds the cores again by comparing
``|θi − θ0|`` with ``t_i`` at every entry of every tensor; with them it touches only
the core entries. The result is the same either way (tested); this is only speed.

Pure data (numpy and torch, no mergekit types). ``cpi-merge`` configures the merge
method with them for one merge (:meth:`cpi_merge.fusion.method.CpiMethod.configured`);
the method uses them only for a tensor of the analysed size and thresholds that match
bit for bit, else it computes the cores itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpi_merge.analysis.core_rule import CoreBoundary, same_boundary


@dataclass(frozen=True)
class KnownCores:
    """Every task's core positions, per tensor.

    Attributes:
        boundaries: Each task's core boundary, in recipe order.
        positions: Per tensor name, per task: the ascending flat positions of its core
            entries within that tensor (int32 when the tensor allows, to halve memory).
        numel: Entries per tensor name.

    """

    boundaries: tuple[CoreBoundary, ...]
    positions: dict[str, tuple[np.ndarray, ...]]
    numel: dict[str, int]

    @classmethod
    def from_global(
        cls,
        boundaries: Sequence[CoreBoundary],
        cores: Sequence[np.ndarray],
        tensors: Sequence[tuple[str, int]],
    ) -> KnownCores:
        """Split global core indices (tensors laid end to end, in order) by tensor.

        Args:
            boundaries: Each task's core boundary.
            cores: Per task, sorted global flat indices of its core entries.
            tensors: ``(name, numel)`` of every analysed tensor, in streaming order.

        """
        starts = np.cumsum([0] + [n for _, n in tensors])
        cuts = [np.searchsorted(core, starts) for core in cores]
        positions = {}
        for j, (name, n) in enumerate(tensors):
            dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64
            positions[name] = tuple(
                (core[cut[j] : cut[j + 1]] - starts[j]).astype(dtype)
                for core, cut in zip(cores, cuts, strict=True)
            )
        return cls(tuple(boundaries), positions, dict(tensors))

    def for_tensor(
        self, name: str, boundaries: Sequence[CoreBoundary | None], numel: int
    ) -> list[torch.Tensor | None] | None:
        """Core positions of one tensor, per model, or None when these cores don't apply.

        Args:
            name: Tensor name.
            boundaries: Per model of the merge, its core's boundary (``None`` for models
                that are not tasks); the tasks' must equal those of the analysis.
            numel: Entries of the tensor being merged.

        Returns:
            int64 positions per model (``None`` for models that are not tasks).

        """
        tasks = [b for b in boundaries if b is not None]
        if (
            self.numel.get(name) != numel
            or len(tasks) != len(self.boundaries)
            or not all(same_boundary(a, b) for a, b in zip(tasks, self.boundaries, strict=True))
        ):
            return None
        per_task = iter(self.positions[name])
        return [None if b is None else torch.from_numpy(next(per_task)).long() for b in boundaries]
