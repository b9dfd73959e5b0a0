"""``cpi-analyze`` as a function: recipe in, :class:`CorePlan` (and its files) out.

Pipeline: validate the recipe → open every checkpoint and check headers and shapes →
stream |θi − θ0| once (``buffer``) or three times (``histogram``) for the exact global
top-k → Jaccard → groups → stage order → ``cpi_plan.json`` and pictures.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import numpy

from cpi_merge.checkpoints import Checkpoint, TensorInfo, check_compatible, open_checkpoint
from cpi_merge.core_select import (
    BUFFER_BYTES_PER_CORE_ENTRY,
    CoreSelection,
    CutTooHighError,
    select_cores_buffer,
    select_cores_histogram,
)
from cpi_merge.delta_stream import DEFAULT_CHUNK_ENTRIES, DeltaStream
from cpi_merge.errors import CheckpointError, RecipeError
from cpi_merge.grouping import StageOrder, group_tasks, jaccard_matrix, order_stages
from cpi_merge.known_cores import KnownCores
from cpi_merge.output_dir import check_output_location, staged_output
from cpi_merge.plan import PLAN_FILE, CorePlan, TaskCore, TensorRecord, threshold_record
from cpi_merge.recipe import CpiRecipe, load_recipe, torch_dtype
from cpi_merge.starting_cut import estimate_cuts

LOG = logging.getLogger(__name__)
Strategy = Literal["auto", "buffer", "histogram"]


@dataclass
class OpenedModels:
    """A recipe's checkpoints, opened and checked against each other."""

    recipe: CpiRecipe
    base: Checkpoint
    models: list[Checkpoint]
    """Every model of ``models:``, in recipe order."""
    tensors: list[TensorInfo]
    """The floating-point tensors of the base, in streaming order."""

    @property
    def tasks(self) -> list[Checkpoint]:
        """The task models (with a core region), in recipe order."""
        return [c for c, m in zip(self.models, self.recipe.models, strict=True) if m.is_task]

    @property
    def local_folders(self) -> list[str]:
        """Every input folder."""
        return [self.base.path] + [c.path for c in self.models]


def open_models(recipe: CpiRecipe, *, allow_pickle: bool = False) -> OpenedModels:
    """Open the base and every model, and check they store the same float tensors.

    Args:
        recipe: The validated recipe.
        allow_pickle: Accept pickle (``.bin``) checkpoints.

    Returns:
        The opened models.

    Raises:
        CheckpointError: Listing every model that could not be opened, or every mismatch.

    """
    problems: list[str] = []
    opened: list[Checkpoint | None] = []
    roles = ["base_model"] + [f"models[{i}]" for i in range(len(recipe.models))]
    refs = [recipe.base_model] + [m.model for m in recipe.models]
    for role, ref in zip(roles, refs, strict=True):
        try:
            opened.append(open_checkpoint(ref, role=role, allow_pickle=allow_pickle))
        except CheckpointError as exc:
            problems.append(str(exc))
            opened.append(None)
    if problems:
        raise CheckpointError("\n".join(problems))
    base, models = opened[0], opened[1:]
    check_compatible(base, list(zip(roles[1:], models, strict=True)))
    tensors = base.float_tensors
    if not tensors:
        raise CheckpointError(f"base_model {base.reference!r} stores no floating-point tensors")
    return OpenedModels(recipe=recipe, base=base, models=models, tensors=tensors)


def core_size(core_fraction: float, total: int) -> int:
    """K = floor(p · D), exact for p's decimal value (0.29 × 100 is 29, not 28).

    Raises:
        RecipeError: k would be 0 (p selects nothing).

    """
    k = int(Decimal(repr(core_fraction)) * total)
    if k < 1:
        raise RecipeError(
            f"parameters.core_fraction: {core_fraction} selects floor(p × D) = 0 of the "
            f"D = {total:,} entries; use core_fraction >= {1 / total:.3g}"
        )
    return k


def default_memory_budget() -> int:
    """40% of physical memory, in bytes."""
    try:
        return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def choose_strategy(strategy: Strategy, *, n_tasks: int, k: int, memory_budget: int) -> str:
    """Pick ``buffer`` (one pass) unless its worst-case memory exceeds the budget.

    The buffer peaks at about 3k (value, index) pairs per task: 36 bytes per core entry.
    """
    if strategy != "auto":
        return strategy
    need = n_tasks * k * BUFFER_BYTES_PER_CORE_ENTRY
    chosen = "buffer" if need <= memory_budget else "histogram"
    LOG.info(
        "strategy %s: buffer needs up to %.2f GB, budget %.2f GB",
        chosen,
        need / 1e9,
        memory_budget / 1e9,
    )
    return chosen


def package_version() -> str:
    """``cpi-merge <version>`` (or a source-tree marker), for provenance records."""
    try:
        return f"cpi-merge {version('cpi-merge')}"
    except PackageNotFoundError:
        return "cpi-merge (source tree)"


def _tensor_record(info: TensorInfo) -> TensorRecord:
    return TensorRecord(name=info.name, shape=list(info.shape), numel=info.numel)


def build_plan(
    opened: OpenedModels,
    selection: CoreSelection,
    stream: DeltaStream,
    *,
    k: int,
    seed: int,
    order: StageOrder,
    strategy: str,
) -> CorePlan:
    """Assemble the :class:`CorePlan` from an exact selection."""
    recipe = opened.recipe
    names = [t.name for t in opened.tensors]
    refs = [m.model for m in recipe.tasks]
    jaccard = jaccard_matrix(selection.intersections)
    groups = order_stages(group_tasks(jaccard, recipe.parameters.tau), order, seed)
    norms = stream.stats.relative_norms()
    tasks = []
    for i, ref in enumerate(refs):
        value, bits = threshold_record(selection.thresholds[i])
        tasks.append(
            TaskCore(
                model=ref,
                core_threshold=value,
                core_threshold_bits=bits,
                core_count=int(selection.intersections[i][i]),
                relative_update_norm=norms[i],
                per_tensor={n: int(c) for n, c in zip(names, selection.counts[i], strict=True)},
            )
        )
    return CorePlan(
        created_by=package_version(),
        base_model=recipe.base_model,
        dtype=recipe.dtype,
        total_parameters=stream.total,
        k=k,
        core_fraction=recipe.parameters.core_fraction,
        tau=recipe.parameters.tau,
        seed=seed,
        order=order,
        strategy=strategy,
        tensors=[
            TensorRecord(name=t.name, shape=list(t.shape), numel=t.numel) for t in opened.tensors
        ],
        tasks=tasks,
        intersections=selection.intersections.tolist(),
        jaccard=jaccard.tolist(),
        groups=[[refs[i] for i in g] for g in groups],
    )


def run_analysis(opened: OpenedModels, **options: Any) -> CorePlan:
    """Stream the opened models and compute the exact plan (see :func:`analyze`).

    Args:
        opened: The opened models.
        **options: As for :func:`run_analysis_keeping_cores` (except ``keep_cores``).
    """
    return run_analysis_keeping_cores(opened, keep_cores=False, **options)[0]


def run_analysis_keeping_cores(
    opened: OpenedModels,
    *,
    seed: int = 0,
    order: StageOrder = "random",
    strategy: Strategy = "auto",
    memory_budget: int | None = None,
    progress: bool = True,
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
    keep_cores: bool = True,
) -> tuple[CorePlan, KnownCores | None]:
    """:func:`run_analysis`, also returning the core positions when the strategy kept them.

    Args:
        opened: The opened models.
        seed: Seed of the random stage order.
        order: ``"random"`` or ``"given"``.
        strategy: ``"auto"``, ``"buffer"`` or ``"histogram"`` (see :func:`analyze`).
        memory_budget: Bytes the buffer strategy may use.
        progress: Show progress bars.
        chunk_entries: Float32 scratch per buffer, in entries.
        keep_cores: False returns None for the positions (and frees them at once).

    Returns:
        The plan, and each task's core positions per tensor (``buffer`` strategy; None
        for ``histogram``), for the merge method to use instead of finding them again.
    """
    if order not in ("random", "given"):
        raise RecipeError(f"order {order!r} is not one of 'random', 'given'")
    if strategy not in ("auto", "buffer", "histogram"):
        raise RecipeError(f"strategy {strategy!r} is not one of 'auto', 'buffer', 'histogram'")
    recipe = opened.recipe
    stream = DeltaStream(
        opened.base,
        opened.tasks,
        opened.tensors,
        cast=torch_dtype(recipe.dtype),
        chunk_entries=chunk_entries,
        progress=progress,
    )
    k = core_size(recipe.parameters.core_fraction, stream.total)
    labels = [c.reference for c in opened.tasks]
    chosen = choose_strategy(
        strategy,
        n_tasks=len(labels),
        k=k,
        memory_budget=memory_budget if memory_budget is not None else default_memory_budget(),
    )
    if chosen == "buffer":
        # Start each task's buffer at a cut guessed from a small sample, so that few
        # entries below the final threshold are ever buffered; exact whatever the guess.
        cuts = estimate_cuts(stream.sample(), k=k, total=stream.total)
        select = dict(k=k, tensor_offsets=stream.offsets, labels=labels, total=stream.total)
        try:
            selection = select_cores_buffer(stream("core regions"), cuts=cuts, **select)
        except CutTooHighError:
            LOG.info("a sampled starting cut was too high; selecting again from 0")
            selection = select_cores_buffer(stream("core regions (again)"), **select)
    else:
        passes = iter(["pass 1/3: histogram", "pass 2/3: threshold", "pass 3/3: overlaps"])
        selection = select_cores_histogram(
            lambda: stream(next(passes)),
            k=k,
            n_tensors=len(opened.tensors),
            labels=labels,
            total=stream.total,
        )
    for ckpt in [opened.base, *opened.models]:
        ckpt.close()  # release the mapped shards before whatever comes next (the merge)
    plan = build_plan(opened, selection, stream, k=k, seed=seed, order=order, strategy=chosen)
    cores = None
    if keep_cores and selection.positions is not None:
        cores = KnownCores.from_global(
            selection.thresholds,
            selection.positions,
            [(t.name, t.numel) for t in opened.tensors],
        )
    return plan, cores


def plan_from_thresholds(opened: OpenedModels, thresholds: list[float]) -> CorePlan:
    """A plan for thresholds given in the recipe: no pass over the data, so no overlaps.

    Args:
        opened: The opened models.
        thresholds: ``t_i`` per task, in recipe order.

    """
    recipe = opened.recipe
    total = sum(t.numel for t in opened.tensors)
    tasks = []
    for entry, t in zip(recipe.tasks, thresholds, strict=True):
        value, bits = threshold_record(float(numpy.float32(t)))
        tasks.append(TaskCore(model=entry.model, core_threshold=value, core_threshold_bits=bits))
    return CorePlan(
        source="recipe",
        created_by=package_version(),
        base_model=recipe.base_model,
        dtype=recipe.dtype,
        total_parameters=total,
        k=core_size(recipe.parameters.core_fraction, total),
        core_fraction=recipe.parameters.core_fraction,
        tau=recipe.parameters.tau,
        seed=None,
        order=None,
        strategy=None,
        tensors=[_tensor_record(t) for t in opened.tensors],
        tasks=tasks,
        intersections=None,
        jaccard=None,
        groups=None,
    )


def analyze(
    recipe: CpiRecipe | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    order: StageOrder = "random",
    strategy: Strategy = "auto",
    memory_budget: int | None = None,
    force: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    plots: bool = True,
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
) -> CorePlan:
    """Find every task's exact core region, the overlaps, groups and stage order.

    Args:
        recipe: A :class:`CpiRecipe` or the path of a YAML recipe.
        out_dir: Folder to write ``cpi_plan.json`` and pictures into (created; replaced
            only with ``force``). ``None`` writes nothing.
        seed: Seed of the random stage order.
        order: ``"random"`` (the paper) or ``"given"`` (recipe order).
        strategy: ``"buffer"`` (one pass), ``"histogram"`` (three passes, constant
            memory) or ``"auto"`` (buffer when it fits ``memory_budget``). Both exact.
        memory_budget: Bytes the buffer strategy may use (default 40% of RAM).
        force: Replace a non-empty ``out_dir``.
        progress: Show progress bars.
        allow_pickle: Accept pickle checkpoints (unsafe).
        plots: Also write the pictures.
        chunk_entries: Float32 scratch per buffer, in entries.

    Returns:
        The plan.

    Raises:
        RecipeError, CheckpointError, NonFiniteError, DegenerateTaskError, OutputError:
            With the model, tensor and value at fault.

    """
    if not isinstance(recipe, CpiRecipe):
        recipe = load_recipe(recipe)
    opened = open_models(recipe, allow_pickle=allow_pickle)
    if out_dir is not None:
        check_output_location(out_dir, force=force, inputs=opened.local_folders)
    plan = run_analysis(
        opened,
        seed=seed,
        order=order,
        strategy=strategy,
        memory_budget=memory_budget,
        progress=progress,
        chunk_entries=chunk_entries,
    )
    if out_dir is not None:
        write_outputs(plan, out_dir, force=force, plots=plots, inputs=opened.local_folders)
    return plan


def write_plan_files(plan: CorePlan, folder: str | os.PathLike, *, plots: bool = True) -> list[str]:
    """Write ``cpi_plan.json`` (and the pictures, for analysed plans) into ``folder``.

    Returns:
        The file names written.

    """
    folder = Path(folder)
    plan.save(folder / PLAN_FILE)
    return [PLAN_FILE] + (write_plan_pictures(plan, folder) if plots else [])


def write_plan_pictures(plan: CorePlan, folder: str | os.PathLike) -> list[str]:
    """Write the pictures of an analysed plan into ``folder`` (none for a recipe's plan).

    Returns:
        The file names written.

    """
    if not plan.analysed:
        return []
    from cpi_merge.plots import write_plots

    return [p.name for p in write_plots(plan, Path(folder))]


def write_outputs(
    plan: CorePlan,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    plots: bool = True,
    inputs: list[str] | None = None,
) -> Path:
    """Write the plan files into ``out_dir`` atomically (see :mod:`cpi_merge.output_dir`).

    Returns:
        The output folder.

    """
    with staged_output(out_dir, force=force, inputs=inputs or []) as tmp:
        write_plan_files(plan, tmp, plots=plots)
    return Path(out_dir)
