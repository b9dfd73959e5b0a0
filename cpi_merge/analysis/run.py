"""The analysis pipeline over opened models: stream Δ, select exact cores, build the plan.

Opened, checked models in → stream |θi − θ0| once (``buffer``) or twice (``histogram``;
more only under heavy ties in little memory) for the exact global top-k → Jaccard →
groups → stage order → :class:`CorePlan` (plus, on request, the core positions for the
merge method). Writes
nothing: :func:`cpi_merge.commands.analyze` is ``cpi-analyze`` with its files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cpi_merge.analysis.boundary import TensorLayout
from cpi_merge.analysis.delta_stream import DEFAULT_CHUNK_ENTRIES, DeltaStream
from cpi_merge.analysis.grouping import StageOrder
from cpi_merge.analysis.known_cores import KnownCores
from cpi_merge.analysis.plan import CorePlan
from cpi_merge.analysis.plan_build import build_plan
from cpi_merge.analysis.select_buffer import CutTooHighError, select_cores_buffer
from cpi_merge.analysis.select_histogram import select_cores_histogram
from cpi_merge.analysis.sizing import (
    STRATEGIES,
    Strategy,
    choose_strategy,
    core_size,
    default_memory_budget,
)
from cpi_merge.analysis.starting_cut import estimate_cuts
from cpi_merge.config.recipe import torch_dtype
from cpi_merge.errors import RecipeError
from cpi_merge.io.opened import OpenedModels

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisOptions:
    """How to run the analysis (shared by ``cpi-analyze`` and ``cpi-merge``).

    Attributes:
        seed: Seed of the random stage order.
        order: ``"random"`` (the paper) or ``"given"`` (recipe order).
        strategy: ``"buffer"`` (one pass), ``"histogram"`` (two passes, bounded
            memory) or ``"auto"`` (buffer when it fits ``memory_budget``). Both exact.
        memory_budget: Bytes the buffer strategy may use (default 40% of RAM).
        progress: Show progress bars.
        chunk_entries: Float32 scratch per buffer, in entries.
        energy_curve: Also measure each task's exact energy curve and ``p_holding``
            (a histogram per task on the first pass: slower, see
            :mod:`cpi_merge.analysis.update_stats`).
    """

    seed: int = 0
    order: StageOrder = "random"
    strategy: Strategy = "auto"
    memory_budget: int | None = None
    progress: bool = True
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES
    energy_curve: bool = False

    def __post_init__(self) -> None:
        if self.order not in ("random", "given"):
            raise RecipeError(f"order {self.order!r} is not one of 'random', 'given'")
        if self.strategy not in STRATEGIES:
            allowed = ", ".join(map(repr, STRATEGIES))
            raise RecipeError(f"strategy {self.strategy!r} is not one of {allowed}")


@dataclass(frozen=True)
class Analysis:
    """What an analysis produced."""

    plan: CorePlan
    cores: KnownCores | None
    """Every task's core positions, when the strategy ended holding them (``buffer``) and
    they were asked for; else None."""


def run_analysis(
    opened: OpenedModels, options: AnalysisOptions, *, keep_cores: bool = False
) -> Analysis:
    """Stream the opened models and compute the exact plan (see :func:`cpi_merge.commands.analyze`).

    Args:
        opened: The opened models.
        options: How to run it.
        keep_cores: Also return the core positions when the strategy holds them, for the
            merge method to use instead of finding them again (else they are freed).

    Returns:
        The plan and, if asked for and available, the core positions.
    """
    recipe = opened.recipe
    stream = DeltaStream(
        opened.base,
        opened.tasks,
        opened.tensors,
        cast=torch_dtype(recipe.dtype),
        chunk_entries=options.chunk_entries,
        progress=options.progress,
        vocabulary=opened.vocabulary,
        energy_curve=options.energy_curve,
    )
    k = core_size(recipe.parameters.core_fraction, stream.total)
    labels = opened.task_names
    budget = options.memory_budget
    budget = budget if budget is not None else default_memory_budget()
    choice = choose_strategy(options.strategy, n_tasks=len(labels), k=k, memory_budget=budget)
    chosen = choice.name
    select = dict(
        k=k,
        layout=TensorLayout([t.name for t in opened.tensors], stream.offsets),
        labels=labels,
        total=stream.total,
        exact_k=bool(recipe.parameters.exact_k),
        seed=recipe.parameters.tie_seed,
    )
    # A small sample of Δ (a fraction of a pass): the energy curves' estimate, and the
    # buffer's starting cuts.
    samples = None if options.energy_curve else stream.sample()
    if chosen == "buffer":
        # Start each task's buffer at a cut guessed from the sample, so that few entries
        # below the final threshold are ever buffered; exact whatever the guess.
        samples = samples if samples is not None else stream.sample()
        cuts = estimate_cuts(samples, k=k, total=stream.total)
        try:
            selection = select_cores_buffer(stream("core regions"), cuts=cuts, **select)
        except CutTooHighError:
            LOG.info("a sampled starting cut was too high; selecting again from 0")
            selection = select_cores_buffer(stream("core regions (again)"), **select)
    else:
        # The sample points the first pass at each boundary (usually two passes in all).
        samples = samples if samples is not None else stream.sample()
        selection = select_cores_histogram(stream, memory_budget=budget, samples=samples, **select)
    opened.close()  # release the mapped shards before whatever comes next (the merge)
    plan = build_plan(
        opened,
        selection,
        total=stream.total,
        k=k,
        stats=stream.stats,
        seed=options.seed,
        order=options.order,
        strategy=chosen,
        strategy_reason=choice.reason,
        samples=None if options.energy_curve else samples,
    )
    cores = None
    if keep_cores and selection.positions is not None:
        cores = KnownCores.from_global(
            selection.boundaries,
            selection.positions,
            [(t.name, t.numel) for t in opened.tensors],
        )
    return Analysis(plan, cores)
