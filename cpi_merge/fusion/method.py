"""The ``cpi`` merge method for mergekit: a thin adapter over the fusion kernel.

mergekit has no plugin discovery, so the method must be registered explicitly before a
merge runs (``cpi-merge`` does it for you)::

    from cpi_merge.fusion.method import register_cpi_method
    register_cpi_method()            # refuses if another method already took the name

Per tensor, mergekit hands the method θ0 (``base_model``) and every model of ``models:``
in recipe order, already cast to the recipe's ``dtype``. Every task must carry its
``core_threshold`` (``cpi-merge`` fills them in from the analysis).

mergekit finds a method by its name, so there is one registered instance. ``cpi-merge``
configures it for the duration of one merge with the core positions its analysis found
(:meth:`CpiMethod.configured`): the method then touches only those entries instead of
comparing every entry with its threshold. The result is the same either way; a second
configuration while one is active (two merges in threads of one process) is refused.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from mergekit.merge_methods import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    TensorGroup,
    register,
    registered_methods,
)
from mergekit.merge_methods.base import ParameterSpec as Param

from cpi_merge.analysis.core_rule import MAX_HASH, CoreBoundary
from cpi_merge.analysis.known_cores import KnownCores
from cpi_merge.config.recipe import DEFAULT_CORE_FRACTION, DEFAULT_EPSILON, DEFAULT_TAU, METHOD_NAME
from cpi_merge.errors import CheckpointError, CpiError, RecipeError
from cpi_merge.faults import pause_point
from cpi_merge.fusion.kernel import fuse_tensor

PAPER_URL = "https://arxiv.org/abs/2508.21741"
UNSET = -1.0
_EACH = ParameterScope.NON_BASE
_SHARED = ParameterScope.SHARED


class CpiMethod(GroupMergeMethod):
    """CPI-FT fusion of one tensor group (see :mod:`cpi_merge.fusion.kernel`).

    Each task's core is given by its boundary: ``core_threshold`` and, for an exact-k core,
    ``tie_base_abs`` and ``tie_hash`` (:mod:`cpi_merge.analysis.core_rule`), with the
    recipe's ``tie_seed``. ``base_vocab_rows`` (set by ``cpi-merge`` with a tokenizer
    option) limits cores and the fold to the embedding rows of the base's tokens.
    ``core_fraction``, ``tau`` and ``exact_k`` are accepted so that the recipe validates;
    they act in the analysis, not here.
    """

    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="CPI-FT fusion (core parameter isolation + SLERP)",
        reference_url=PAPER_URL,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        parameters=(
            Param("omega", float, _EACH, default=0.5),
            Param("core_threshold", float, _EACH, default=UNSET),
            Param("tie_base_abs", float, _EACH, default=math.inf),
            Param("tie_hash", float, _EACH, default=float(MAX_HASH)),
            Param("fusion_base", int, _EACH, default=0),
            Param("task", int, _EACH, default=1),
            Param("core_fraction", float, _SHARED, default=DEFAULT_CORE_FRACTION),
            Param("tau", float, _SHARED, default=DEFAULT_TAU),
            Param("epsilon", float, _SHARED, default=DEFAULT_EPSILON),
            Param("exact_k", int, _SHARED, default=1),
            Param("tie_seed", int, _SHARED, default=0),
            Param("base_vocab_rows", int, _SHARED, default=-1),
        ),
    )

    def __init__(self) -> None:
        self._cores: KnownCores | None = None
        self._lock = threading.Lock()

    @contextmanager
    def configured(self, cores: KnownCores | None) -> Iterator[CpiMethod]:
        """Use ``cores`` (positions found by an analysis of these very inputs) in this block.

        Raises:
            CpiError: The method is already configured by another merge in this process.
        """
        if cores is None:
            yield self
            return
        if not self._lock.acquire(blocking=False):
            raise CpiError(
                "the cpi method is already configured by another merge running in this "
                "process; run merges one after another"
            )
        self._cores = cores
        try:
            yield self
        finally:
            self._cores = None
            self._lock.release()

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        """Fuse one tensor group."""
        name = group.metadata.name or "<tensor>"
        pause_point("merge")
        entries = group.non_base
        theta0 = group.base.tensor
        if not theta0.is_floating_point():
            return theta0
        task, threshold = params["task"], params["core_threshold"]
        boundaries: list[CoreBoundary | None] = []
        for entry in entries:
            if task[entry.id] == 0:
                boundaries.append(None)
                continue
            t = threshold[entry.id]
            if not (t > 0 and math.isfinite(t)):
                raise RecipeError(
                    f"tensor {name}: model {entry.id} has no core_threshold (got {t}); run "
                    "cpi-merge, which computes them, or set models[].parameters.core_threshold"
                )
            boundaries.append(
                CoreBoundary(
                    float(t),
                    float(params["tie_base_abs"][entry.id]),
                    int(params["tie_hash"][entry.id]),
                    seed=int(params["tie_seed"]),
                )
            )
        flagged = [i for i, e in enumerate(entries) if params["fusion_base"][e.id] == 1]
        if len(flagged) > 1:
            raise RecipeError(f"fusion_base: 1 is set on {len(flagged)} models; set it on one")
        omegas = [float(params["omega"][e.id]) for e in entries]
        if any(not 0.0 <= w <= 1.0 for w in omegas):
            raise RecipeError(f"omega must be in [0, 1]; got {omegas}")
        cores = self._cores
        analysed = _analysed_entries(group, int(params["base_vocab_rows"]))
        # The kernel's scratch buffers live in CPU memory: with --cuda, the tensors mergekit
        # moved to the GPU come back for the fusion (and the result goes back to the GPU).
        device = theta0.device
        try:
            fused = fuse_tensor(
                theta0.cpu(),
                [e.tensor.cpu() for e in entries],
                boundaries=boundaries,
                omegas=omegas,
                fusion_base=flagged[0] if flagged else len(entries) - 1,
                epsilon=float(params["epsilon"]),
                name=name,
                analysed_entries=analysed,
                core_positions=(
                    cores.for_tensor(name, boundaries, analysed or theta0.numel())
                    if cores
                    else None
                ),
            )
        except CheckpointError as exc:
            raise type(exc)(f"tensor {name}: {exc}; no output was written") from None
        return fused.to(device)


def _analysed_entries(group: TensorGroup, base_vocab_rows: int) -> int | None:
    """Entries of a vocabulary tensor that belong to the base's tokens (None: all)."""
    axis = group.metadata.vocabulary_axis
    shape = group.base.tensor.shape
    if base_vocab_rows < 0 or axis is None or shape[axis] <= base_vocab_rows:
        return None
    if axis != 0:
        raise RecipeError(
            f"tensor {group.metadata.name}: vocabulary along axis {axis}; cpi supports "
            "vocabulary-indexed tensors with the vocabulary along axis 0 only"
        )
    return base_vocab_rows * (group.base.tensor.numel() // shape[0])


def register_cpi_method() -> CpiMethod:
    """Register the ``cpi`` method with mergekit (idempotent for this very method).

    Returns:
        The registered method (configure it per merge with :meth:`CpiMethod.configured`).

    Raises:
        CpiError: Another method already uses the name ``cpi``.

    """
    for method in registered_methods():
        if method.spec.name == METHOD_NAME:
            if isinstance(method, CpiMethod):
                return method
            raise CpiError(
                f"mergekit already has a different merge method named {METHOD_NAME!r} "
                f"({type(method).__name__}); refusing to replace it"
            )
    method = CpiMethod()
    register(method)
    return method
