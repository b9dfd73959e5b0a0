"""Which entries to freeze: the cores of chosen tasks, recomputed from the plan.

A task's core is recomputed from the plan's thresholds by streaming over θ0 and θi (the
plan's resolved references), with the same float32 arithmetic, input cast and
membership rule (:mod:`cpi_merge.analysis.core_rule`) as the analysis. Positions are returned as
int32 per parameter name; only core positions are ever materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from cpi_merge.analysis.core_rule import core_mask
from cpi_merge.analysis.delta_stream import DeltaStream
from cpi_merge.analysis.plan import CorePlan
from cpi_merge.config.recipe import torch_dtype
from cpi_merge.errors import CheckpointError
from cpi_merge.io.checkpoints import open_checkpoint
from cpi_merge.io.compatibility import check_compatible
from cpi_merge.io.lora import LoraCache
from cpi_merge.io.vocabulary import align_vocabularies


def check_plan_matches_model(
    plan: CorePlan, shapes: dict[str, tuple[int, ...]], buffers: set[str] = frozenset()
) -> None:
    """Require the plan's tensors to be parameters of the model, with the same shapes.

    Args:
        plan: The plan.
        shapes: Parameter name → shape of the model being trained.
        buffers: Names of the model's buffers: stored float buffers (an attention mask in
            old checkpoints) are in a plan but are not trained, so they are not checked.

    Raises:
        CheckpointError: Listing every missing parameter and shape mismatch.
    """
    problems = []
    vocabulary = set(plan.vocabulary_tensors or ())
    for t in plan.tensors:
        if t.name in buffers:
            continue
        if t.name not in shapes:
            problems.append(f"{t.name!r} is in the plan but not a parameter of the model")
        elif t.name in vocabulary and shapes[t.name][1:] == tuple(t.shape[1:]):
            if shapes[t.name][0] < t.shape[0]:  # the model must hold the analysed rows
                problems.append(
                    f"{t.name!r} has {shapes[t.name][0]:,} rows in the model, fewer than the "
                    f"{t.shape[0]:,} analysed base-token rows of the plan"
                )
        elif tuple(shapes[t.name]) != tuple(t.shape):
            problems.append(
                f"{t.name!r} has shape {list(shapes[t.name])} in the model, {t.shape} in the plan"
            )
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointError(
            "the plan does not describe this model:\n" + "\n".join(f"  - {p}" for p in shown)
        )


def core_positions(
    plan: CorePlan,
    tasks: Sequence[str],
    *,
    progress: bool = False,
    lora: LoraCache | None = None,
) -> dict[str, torch.Tensor]:
    """Union of the cores of ``tasks``, per tensor, as sorted int32 flat positions.

    Args:
        plan: The analysis plan (thresholds and θ0 / θi references).
        tasks: Names of the tasks whose cores to collect.
        progress: Show a progress bar.
        lora: Where ``base+adapter`` task references are merged.

    Returns:
        Tensor name → positions (only tensors with at least one position).

    Raises:
        CheckpointError: θ0 or a θi cannot be opened, or does not match the plan.
    """
    if not tasks:
        return {}
    known = plan.thresholds
    missing = [t for t in tasks if t not in known]
    if missing:
        raise CheckpointError(f"tasks {missing} are not in the plan (it has {list(known)})")
    base = open_checkpoint(plan.base_model, role="the plan's base_model")
    models = [
        open_checkpoint(plan.task(t).model, role=f"plan task {t!r}", lora=lora) for t in tasks
    ]
    roles = [(f"plan task {t!r}", m) for t, m in zip(tasks, models, strict=True)]
    vocabulary = None
    if plan.vocabulary_rows is not None:
        vocabulary = align_vocabularies(base, roles)
        if vocabulary.rows != plan.vocabulary_rows:
            raise CheckpointError(
                f"the plan's base_model {plan.base_model!r} now has {vocabulary.rows:,} "
                f"tokens, the plan {plan.vocabulary_rows:,}; rerun cpi-analyze"
            )
    check_compatible(base, roles, vocabulary=vocabulary.tensors if vocabulary else frozenset())
    by_name = {t.name: t for t in base.float_tensors}
    if vocabulary is not None:
        by_name = {
            n: replace(t, shape=vocabulary.analysed_shape(n, t.shape)) for n, t in by_name.items()
        }
    wanted = []
    for record in plan.tensors:
        info = by_name.get(record.name)
        if info is None or list(info.shape) != record.shape:
            raise CheckpointError(
                f"the plan's base_model {plan.base_model!r} no longer matches the plan at "
                f"tensor {record.name!r}; rerun cpi-analyze"
            )
        wanted.append(info)
    stream = DeltaStream(
        base,
        models,
        wanted,
        cast=torch_dtype(plan.dtype),
        progress=progress,
        vocabulary=vocabulary,
    )
    boundaries = [plan.boundaries[t] for t in tasks]
    found: dict[str, list[torch.Tensor]] = {}
    for chunk in stream("core positions"):
        start = chunk.offset - stream.offsets[chunk.tensor_index]
        name = wanted[chunk.tensor_index].name
        hit = None
        for d, b in zip(chunk.deltas, boundaries, strict=True):
            mine = core_mask(d, b, base=chunk.base, name=name, start=start)
            hit = mine if hit is None else hit.logical_or_(mine)
        at = hit.nonzero().squeeze(1)
        if at.numel():
            found.setdefault(name, []).append((at + start).to(torch.int32))
    for ckpt in [base, *models]:
        ckpt.close()
    return {name: torch.cat(parts) for name, parts in found.items()}
