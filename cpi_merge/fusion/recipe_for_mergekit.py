"""The recipe mergekit runs: thresholds, task and fusion-base flags explicit, local paths absolute.

It is also what ``cpi-merge`` writes as ``mergekit_config.yml``, so ``mergekit-yaml`` (or
``run_merge``) with the ``cpi`` method registered reproduces the merge without an analysis.
"""

from __future__ import annotations

from cpi_merge.analysis.core_rule import CoreBoundary
from cpi_merge.analysis.plan import CorePlan
from cpi_merge.config.recipe import CpiRecipe
from cpi_merge.errors import RecipeError
from cpi_merge.io.checkpoints import resolved_reference


def recipe_boundaries(recipe: CpiRecipe) -> list[CoreBoundary] | None:
    """The tasks' cores as given in the recipe if every task has a ``core_threshold``.

    A task with ``tie_base_abs`` and ``tie_hash`` has an exact-k core; one with only its
    threshold takes every entry at it (see :mod:`cpi_merge.analysis.core_rule`).

    Returns:
        One boundary per task, or None when no task has a threshold (run the analysis).

    Raises:
        RecipeError: Some tasks have a threshold and others do not.

    """
    given = [m.parameters for m in recipe.tasks]
    if all(p.core_threshold is None for p in given):
        return None
    if any(p.core_threshold is None for p in given):
        missing = [m.model for m in recipe.tasks if m.parameters.core_threshold is None]
        raise RecipeError(
            f"core_threshold is set on some tasks but not on {missing}; set it on every "
            "task (no analysis pass) or on none (cpi-merge runs the analysis)"
        )
    seed = recipe.parameters.tie_seed
    return [
        CoreBoundary(p.core_threshold, seed=seed)
        if p.tie_base_abs is None
        else CoreBoundary(p.core_threshold, p.tie_base_abs, p.tie_hash or 0, seed=seed)
        for p in given
    ]


def mergekit_recipe(recipe: CpiRecipe) -> dict:
    """The recipe as a plain dict with local model folders as absolute paths.

    mergekit's model card asks the Hugging Face Hub about any relative ``dir/name`` path
    that could be a repo id, which fails offline; an absolute path is never looked up.
    """
    doc = recipe.model_dump(mode="json", exclude_none=True)
    doc["base_model"] = resolved_reference(doc["base_model"])
    for entry in doc["models"]:
        entry["model"] = resolved_reference(entry["model"])
    return doc


def resolved_recipe(recipe: CpiRecipe, plan: CorePlan, out_dtype: str | None) -> dict:
    """The recipe as mergekit will run it: thresholds, task and fusion-base flags explicit.

    Args:
        recipe: The validated recipe.
        plan: The plan whose thresholds the merge uses (tasks matched by name).
        out_dtype: Output dtype to set when the recipe sets neither dtype nor out_dtype.

    Returns:
        A plain dict, valid for both :func:`cpi_merge.config.recipe.parse_recipe` and
        mergekit; local model folders are absolute paths.

    """
    doc = mergekit_recipe(recipe)
    boundaries = plan.boundaries
    fusion_base = recipe.fusion_base
    for entry, model, name in zip(doc["models"], recipe.models, recipe.names, strict=True):
        params = entry.setdefault("parameters", {})
        params["task"] = 1 if model.is_task else 0
        params["fusion_base"] = 1 if model is fusion_base else 0
        for key in ("core_threshold", "tie_base_abs", "tie_hash"):
            params.pop(key, None)
        if model.is_task:
            b = boundaries[name]
            params["core_threshold"] = b.threshold
            if not b.takes_every_tie:
                params["tie_base_abs"] = b.tie_base_abs
                params["tie_hash"] = b.tie_hash
    if out_dtype and not recipe.out_dtype and not recipe.dtype:
        doc["out_dtype"] = out_dtype
    if plan.vocabulary_rows is not None:
        doc.setdefault("parameters", {})["base_vocab_rows"] = plan.vocabulary_rows
    return doc
