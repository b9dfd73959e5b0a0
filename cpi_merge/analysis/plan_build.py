"""Building a :class:`~cpi_merge.analysis.plan.CorePlan` from an exact selection.

Or from thresholds given in the recipe (no pass over the data: no counts or groups).
"""

from __future__ import annotations

from cpi_merge.analysis.core_rule import CoreBoundary
from cpi_merge.analysis.diagnostics import sign_conflict_rates, task_diagnostics, verdict
from cpi_merge.analysis.grouping import StageOrder, group_tasks, jaccard_matrix, order_stages
from cpi_merge.analysis.plan import CorePlan, TaskCore, TensorRecord, threshold_record
from cpi_merge.analysis.selection import CoreSelection
from cpi_merge.analysis.sizing import core_size
from cpi_merge.analysis.update_stats import UpdateStats
from cpi_merge.io.checkpoints import resolved_reference
from cpi_merge.io.opened import OpenedModels
from cpi_merge.provenance import package_version


def _tensor_records(opened: OpenedModels) -> list[TensorRecord]:
    return [TensorRecord(name=t.name, shape=list(t.shape), numel=t.numel) for t in opened.tensors]


def _common(opened: OpenedModels, total: int, k: int) -> dict:
    recipe = opened.recipe
    return dict(
        created_by=package_version(),
        base_model=resolved_reference(recipe.base_model),
        dtype=recipe.dtype,
        total_parameters=total,
        k=k,
        core_fraction=recipe.parameters.core_fraction,
        tau=recipe.parameters.tau,
        exact_k=bool(recipe.parameters.exact_k),
        tie_seed=recipe.parameters.tie_seed,
        tensors=_tensor_records(opened),
        **(
            dict(
                vocabulary_rows=opened.vocabulary.rows,
                vocabulary_tensors=sorted(opened.vocabulary.tensors),
            )
            if opened.vocabulary
            else {}
        ),
    )


def _boundary_fields(boundary: CoreBoundary) -> dict:
    value, bits = threshold_record(boundary.threshold)
    fields = dict(core_threshold=value, core_threshold_bits=bits)
    if not boundary.takes_every_tie:
        fields.update(tie_base_abs=boundary.tie_base_abs, tie_hash=boundary.tie_hash)
    return fields


def _sample_size(stats: UpdateStats, samples: list | None, total: int) -> int | None:
    if stats.energy is not None or not samples:
        return None  # exact, or no curve
    size = int(samples[0].numel())
    return None if size >= total else size


def build_plan(
    opened: OpenedModels,
    selection: CoreSelection,
    *,
    total: int,
    k: int,
    stats: UpdateStats,
    seed: int,
    order: StageOrder,
    strategy: str,
    strategy_reason: str | None = None,
    samples: list | None = None,
) -> CorePlan:
    """The plan of an exact selection: thresholds, counts, overlaps, groups, stage order.

    Args:
        opened: The opened models (recipe, tensors).
        selection: The exact selection, tasks in recipe order.
        total: D, entries analysed.
        k: Entries per core.
        stats: The first pass's update statistics (norms, energy, cosines).
        seed: Seed of the random stage order.
        order: ``random`` or ``given``.
        strategy: The strategy that ran.
        strategy_reason: Why it ran (asked for, or auto's memory arithmetic).
        samples: Per task, the sample of |Δ| the energy curve is estimated from when
            ``stats`` holds no exact curve (every entry when the model is that small).
    """
    names = [t.name for t in opened.tensors]
    tasks = opened.recipe.tasks
    labels = opened.task_names
    jaccard = jaccard_matrix(selection.intersections)
    groups = order_stages(group_tasks(jaccard, opened.recipe.parameters.tau), order, seed)
    figures = task_diagnostics(stats, selection, total, samples)
    cosine = stats.cosines()
    conflicts = sign_conflict_rates(selection)
    named_groups = [[labels[i] for i in g] for g in groups]
    cores = []
    for i, entry in enumerate(tasks):
        cores.append(
            TaskCore(
                name=labels[i],
                model=resolved_reference(entry.model),
                **_boundary_fields(selection.boundaries[i]),
                core_count=int(selection.intersections[i][i]),
                at_threshold=selection.at_threshold[i],
                taken_at_threshold=selection.taken_at_threshold[i],
                relative_update_norm=figures[i].relative_update_norm,
                core_energy_share=figures[i].core_energy_share,
                energy_curve=figures[i].energy_curve,
                p_holding=figures[i].p_holding,
                per_tensor={n: int(c) for n, c in zip(names, selection.counts[i], strict=True)},
            )
        )
    return CorePlan(
        **_common(opened, total, k),
        seed=seed,
        order=order,
        strategy=strategy,
        strategy_reason=strategy_reason,
        tasks=cores,
        intersections=selection.intersections.tolist(),
        jaccard=jaccard.tolist(),
        groups=named_groups,
        task_cosine=cosine,
        sign_conflict_rate=conflicts,
        energy_curve_sample=_sample_size(stats, samples, total),
        verdict=verdict(
            labels,
            figures,
            cosine,
            conflicts,
            named_groups,
            opened.recipe.parameters.core_fraction,
        ),
    )


def plan_from_boundaries(opened: OpenedModels, boundaries: list[CoreBoundary]) -> CorePlan:
    """A plan for cores given in the recipe: no pass over the data, so no counts or overlaps.

    Args:
        opened: The opened models.
        boundaries: Each task's core boundary, in recipe order.

    """
    total = sum(t.numel for t in opened.tensors)
    cores = []
    for entry, name, b in zip(opened.recipe.tasks, opened.task_names, boundaries, strict=True):
        cores.append(
            TaskCore(name=name, model=resolved_reference(entry.model), **_boundary_fields(b))
        )
    return CorePlan(
        **_common(opened, total, core_size(opened.recipe.parameters.core_fraction, total)),
        source="recipe",
        tasks=cores,
    )
