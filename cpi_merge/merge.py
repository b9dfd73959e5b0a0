"""``cpi-merge`` as a function: analysis (if needed), then mergekit's own merge with ``cpi``.

The output folder is a Hugging Face model folder written by mergekit (sharding, config,
tokenizer, model card), plus ``cpi_plan.json`` (the analysis used), the pictures,
``mergekit_config.yml`` (the resolved recipe: thresholds filled in, local folders as
absolute paths) and
``cpi_manifest.json`` (sizes and SHA-256 of every input and output file, written last).
It appears only when complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from cpi_merge.analysis import (
    OpenedModels,
    Strategy,
    open_models,
    plan_from_thresholds,
    run_analysis_keeping_cores,
    write_plan_files,
    write_plan_pictures,
)
from cpi_merge.checksums import folder_digests, hash_folder
from cpi_merge.errors import OutputError, RecipeError
from cpi_merge.grouping import StageOrder
from cpi_merge.known_cores import known_cores
from cpi_merge.model_card import cpi_card_section
from cpi_merge.output_dir import check_output_location, staged_output
from cpi_merge.plan import CorePlan
from cpi_merge.recipe import CpiRecipe, load_recipe

LOG = logging.getLogger(__name__)
MANIFEST_FILE = "cpi_manifest.json"


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` produced."""

    out_dir: Path
    plan: CorePlan


def _stored_dtype(opened: OpenedModels, reference: str) -> str:
    ckpt = next(c for c in opened.models if c.reference == reference)
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in ckpt.float_tensors)
    return counts.most_common(1)[0][0]


def recipe_thresholds(recipe: CpiRecipe) -> list[float] | None:
    """The tasks' ``core_threshold`` values if every task has one, else None.

    Raises:
        RecipeError: Some tasks have a threshold and others do not.

    """
    given = [m.parameters.core_threshold for m in recipe.tasks]
    if all(t is None for t in given):
        return None
    if any(t is None for t in given):
        missing = [m.model for m in recipe.tasks if m.parameters.core_threshold is None]
        raise RecipeError(
            f"core_threshold is set on some tasks but not on {missing}; set it on every "
            "task (no analysis pass) or on none (cpi-merge runs the analysis)"
        )
    return [float(t) for t in given]


def resolved_recipe(recipe: CpiRecipe, plan: CorePlan, out_dtype: str | None) -> dict:
    """The recipe as mergekit will run it: thresholds, task and fusion-base flags explicit.

    Args:
        recipe: The validated recipe.
        plan: The plan whose thresholds the merge uses.
        out_dtype: Output dtype to set when the recipe sets neither dtype nor out_dtype.

    Returns:
        A plain dict, valid for both :func:`cpi_merge.recipe.parse_recipe` and mergekit.

    """
    doc = recipe.model_dump(mode="json", exclude_none=True)
    thresholds = plan.thresholds
    fusion_base = recipe.fusion_base.model
    for entry, model in zip(doc["models"], recipe.models, strict=True):
        params = entry.setdefault("parameters", {})
        params["task"] = 1 if model.is_task else 0
        params["fusion_base"] = 1 if model.model == fusion_base else 0
        if model.is_task:
            params["core_threshold"] = thresholds[model.model]
    if out_dtype and not recipe.out_dtype and not recipe.dtype:
        doc["out_dtype"] = out_dtype
    return doc


def _absolute_local_paths(doc: dict) -> dict:
    """Write local model folders as absolute paths in the recipe handed to mergekit.

    mergekit's model card asks the Hugging Face Hub about any relative ``dir/name`` path
    that could be a repo id, which fails offline; an absolute path is never looked up.
    """
    doc = dict(doc)
    if os.path.isdir(doc["base_model"]):
        doc["base_model"] = os.path.abspath(doc["base_model"])
    doc["models"] = [
        {**m, "model": os.path.abspath(m["model"])} if os.path.isdir(m["model"]) else m
        for m in doc["models"]
    ]
    return doc


def _without_missing_tokenizer(options, base_path: str):
    """Don't ask mergekit to copy a tokenizer the base does not have (it would log a trace)."""
    has = any(
        os.path.exists(os.path.join(base_path, f))
        for f in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
    )
    if options.copy_tokenizer and not has:
        LOG.warning("base model %s has no tokenizer files; none copied", base_path)
        return options.model_copy(update={"copy_tokenizer": False})
    return options


def _check_tokenizer(base_path: str, out: Path, copy_tokenizer: bool) -> None:
    if not copy_tokenizer or not os.path.exists(os.path.join(base_path, "tokenizer_config.json")):
        return
    if not (out / "tokenizer_config.json").exists():
        raise OutputError(
            f"the base model's tokenizer ({base_path}) was not copied to the output (mergekit "
            "logged the reason above); fix it or pass --no-copy-tokenizer"
        )


def merge(
    recipe: CpiRecipe | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options=None,
    force: bool = False,
    seed: int = 0,
    order: StageOrder = "random",
    strategy: Strategy = "auto",
    memory_budget: int | None = None,
    allow_pickle: bool = False,
    checksums: bool = True,
) -> MergeResult:
    """Run the analysis (unless every task has ``core_threshold``) and mergekit's merge.

    Args:
        recipe: A :class:`CpiRecipe` or the path of a YAML recipe.
        out_dir: The output model folder (new or empty unless ``force``).
        options: mergekit ``MergeOptions`` (``--cuda``, ``--out-shard-size``...); defaults.
        force: Replace a non-empty ``out_dir``.
        seed: Seed of the random stage order (recorded in the plan).
        order: Stage order, ``random`` or ``given``.
        strategy: Analysis strategy (see :func:`cpi_merge.analysis.analyze`).
        memory_budget: Memory for the buffer strategy, bytes.
        allow_pickle: Accept pickle (``.bin``) checkpoints.
        checksums: Record SHA-256 of inputs and outputs in the manifest.

    Returns:
        The output folder and the plan used.

    Raises:
        CpiError: Bad recipe, checkpoints or output location, before any merging.

    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from cpi_merge.merge_method import register_cpi_method

    options = options or MergeOptions()
    if not isinstance(recipe, CpiRecipe):
        recipe = load_recipe(recipe)
    opened = open_models(recipe, allow_pickle=allow_pickle)
    check_output_location(out_dir, force=force, inputs=opened.local_folders)
    given = recipe_thresholds(recipe)
    register_cpi_method()

    # Hashing (inputs now, the output at the end) runs beside the main thread's work.
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpi-merge")
    refs = [("base_model", opened.base)] + [
        (f"models[{i}]", c) for i, c in enumerate(opened.models)
    ]
    hashes = {role: pool.submit(folder_digests, c.path) for role, c in refs} if checksums else {}
    try:
        cores = None
        if given is None:
            plan, cores = run_analysis_keeping_cores(
                opened,
                seed=seed,
                order=order,
                strategy=strategy,
                memory_budget=memory_budget,
                progress=not options.quiet,
            )
        else:
            plan = plan_from_thresholds(opened, given)
        resolved = _absolute_local_paths(
            resolved_recipe(recipe, plan, _stored_dtype(opened, recipe.fusion_base.model))
        )
        config_source = yaml.safe_dump(resolved, sort_keys=False)
        config = MergeConfiguration.model_validate(resolved)
        options = _without_missing_tokenizer(options, opened.base.path)
        with staged_output(out_dir, force=force, inputs=opened.local_folders) as tmp:
            write_plan_files(plan, tmp, plots=False)  # cpi_plan.json, before the hashes
            if recipe.tokenizer_source or recipe.tokenizer:
                cores = None  # mergekit rearranges embedding rows: not the analysed values
            with known_cores(cores):
                run_merge(config, str(tmp), options=options, config_source=config_source)
            del cores
            _check_tokenizer(opened.base.path, tmp, options.copy_tokenizer)
            # The pictures are pure Python: drawn beside the merge they slowed it down by
            # holding the GIL; here they overlap with hashing the output, which does not.
            outputs = pool.submit(hash_folder, tmp) if checksums else None
            write_plan_pictures(plan, tmp)  # PNG files: not among the hashed outputs
            card = tmp / "README.md"
            if options.write_model_card and card.exists():
                # mergekit titles the card with the folder it wrote to: the temporary one.
                text = card.read_text(encoding="utf-8").replace(
                    f"# {tmp.name}\n", f"# {Path(out_dir).resolve().name}\n", 1
                )
                card.write_text(text + cpi_card_section(plan, recipe), encoding="utf-8")
            manifest = {
                "created_by": plan.created_by,
                "mergekit": version("mergekit"),
                "inputs": [
                    {
                        "role": role,
                        "reference": c.reference,
                        "path": os.path.abspath(c.path),
                        "files": hashes[role].result() if checksums else None,
                    }
                    for role, c in refs
                ],
                "outputs": outputs.result() if outputs else None,
            }
            # Written last: a folder with a manifest is a complete one.
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        pool.shutdown(cancel_futures=True)
    return MergeResult(Path(out_dir), plan)
