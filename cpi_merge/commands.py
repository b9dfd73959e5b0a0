"""``cpi-analyze`` and ``cpi-merge`` as Python functions: the whole pipeline, files included.

:func:`analyze`: recipe → open and check every checkpoint → the exact analysis
(:mod:`cpi_merge.analysis`) → ``cpi_plan.json`` and pictures. :func:`merge`: the same
analysis (unless every task has ``core_threshold``), then mergekit's own merge with the
``cpi`` method (:mod:`cpi_merge.fusion`) into a Hugging Face model folder plus
``cpi_plan.json``, the pictures, ``mergekit_config.yml`` (the resolved recipe: thresholds
filled in, local folders as absolute paths) and ``cpi_manifest.json`` (sizes and SHA-256
of every input and output file, written last). Output folders appear only when complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.analysis.plan_build import plan_from_boundaries
from cpi_merge.analysis.run import AnalysisOptions, run_analysis
from cpi_merge.config.recipe import CpiRecipe, load_recipe, torch_dtype
from cpi_merge.errors import OutputError
from cpi_merge.faults import pause_point
from cpi_merge.fusion.recipe_for_mergekit import (
    mergekit_recipe,
    recipe_boundaries,
    resolved_recipe,
)
from cpi_merge.io.digest_memo import DigestMemo
from cpi_merge.io.lora import lora_cache
from cpi_merge.io.manifest import Manifest
from cpi_merge.io.opened import OpenedModels, open_models, recipe_folders
from cpi_merge.io.output_dir import Reservation, reserved_output
from cpi_merge.io.vocabulary import check_output_vocabulary
from cpi_merge.report.model_card import finish_card
from cpi_merge.report.plan_files import write_plan_files, write_plan_pictures

if TYPE_CHECKING:
    from cpi_merge.cli.merge_ahead import MergeAhead

LOG = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` produced."""

    out_dir: Path
    plan: CorePlan


def _stored_dtype(opened: OpenedModels) -> str:
    ckpt = opened.models[opened.recipe.models.index(opened.recipe.fusion_base)]
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in ckpt.float_tensors)
    return counts.most_common(1)[0][0]


def _without_missing_tokenizer(options, base_path: str):
    """Don't ask mergekit to copy a tokenizer the base does not have (it would log a trace)."""
    has = any(os.path.exists(os.path.join(base_path, f)) for f in TOKENIZER_FILES)
    if options.copy_tokenizer and not has:
        LOG.warning("base model %s has no tokenizer files; none copied", base_path)
        return options.model_copy(update={"copy_tokenizer": False})
    return options


def _drop_remote_code(folder: Path) -> None:
    """Remove ``auto_map`` from the output's config: it points to code that is not copied."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("auto_map", None) is not None:
        LOG.warning(
            "the base config's auto_map names remote code, which is not copied (and "
            "trust_remote_code stays off): dropped from the output's config.json"
        )
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def expected_output_bytes(opened: OpenedModels) -> int:
    """About how many bytes the merged model takes (checked against the free space).

    The fusion base's tensors, written in the output dtype, plus 1 MB for small files.
    """
    recipe = opened.recipe
    fusion = opened.models[recipe.models.index(recipe.fusion_base)]
    out_dtype = recipe.out_dtype or recipe.dtype
    size = 1 << 20
    for t in fusion.tensors.values():
        itemsize = torch_dtype(out_dtype).itemsize if out_dtype and t.is_float else None
        size += t.numel * (itemsize or t.dtype.itemsize)
    return size


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
    allow_pickle: bool = False,
    checksums: bool = True,
    rehash: bool = False,
    manifest: Manifest | None = None,
    ahead: MergeAhead | None = None,
    **analysis_options: Any,
) -> MergeResult:
    """Run the analysis (unless every task has ``core_threshold``) and mergekit's merge.

    Args:
        recipe: A :class:`CpiRecipe` or the path of a YAML recipe.
        out_dir: The output model folder (new or empty unless ``force``).
        options: mergekit ``MergeOptions`` (``--cuda``, ``--out-shard-size``...); defaults.
        force: Replace a non-empty ``out_dir``.
        allow_pickle: Accept pickle (``.bin``) checkpoints.
        checksums: Record SHA-256 of inputs and outputs in the manifest.
        rehash: Hash every input from its bytes; by default an input file whose digest
            an earlier run remembered, unchanged since (:mod:`cpi_merge.io.digest_memo`),
            is not hashed again.
        manifest: A :class:`Manifest` already hashing the inputs (the command line starts
            one before mergekit is imported); default: a new one (``checksums``).
        ahead: The output reserved, the models opened and the analysis running since
            before mergekit was imported (:mod:`cpi_merge.cli.merge_ahead`); used only if
            it was started for these very arguments, else released.
        **analysis_options: Fields of :class:`~cpi_merge.analysis.run.AnalysisOptions`
            (``seed``, ``order``, ``strategy``, ``memory_budget``...); progress bars
            follow mergekit's ``quiet``.

    Returns:
        The output folder and the plan used.

    Raises:
        CpiError: Bad recipe, checkpoints or output location, before any merging.

    """
    from mergekit.merge import MergeOptions

    options = options or MergeOptions()
    settings = AnalysisOptions(**{"progress": not options.quiet, **analysis_options})
    manifest = manifest or Manifest(enabled=checksums, memo=None if rehash else DigestMemo())
    if ahead is not None and not ahead.matches(
        recipe, out_dir, force=force, allow_pickle=allow_pickle, settings=settings
    ):
        LOG.debug("the analysis started before mergekit's import was for other arguments")
        ahead.close()
        ahead = None
    if ahead is not None:
        try:
            with ahead.stack:  # the reservation sees the merge's errors (ENOSPC...)
                plan = _merge_opened(ahead.opened, ahead.out, options, settings, manifest, ahead)
        finally:
            manifest.cancel()
        return MergeResult(Path(out_dir), plan)
    if not isinstance(recipe, CpiRecipe):
        recipe = load_recipe(recipe)
    cache, dtype = options.lora_merge_cache, options.lora_merge_dtype
    try:  # a merge that fails, however early, ends the input hashing (which may be held)
        with (
            reserved_output(out_dir, force=force, inputs=recipe_folders(recipe)) as out,
            lora_cache(_references(recipe), cache, dtype, beside=out_dir) as lora,
        ):
            if lora is not None:  # mergekit merges each adapter into the same cache: once
                options = options.model_copy(update={"lora_merge_cache": lora.folder})
            opened = open_models(recipe, allow_pickle=allow_pickle, lora=lora)
            out.require(expected_output_bytes(opened))
            plan = _merge_opened(opened, out, options, settings, manifest)
    finally:
        manifest.cancel()
    return MergeResult(Path(out_dir), plan)


def _references(recipe: CpiRecipe) -> list[str]:
    return [recipe.base_model] + [m.model for m in recipe.models]


def _merge_opened(
    opened: OpenedModels,
    out: Reservation,
    options,
    settings,
    manifest: Manifest,
    ahead: MergeAhead | None = None,
) -> CorePlan:
    """The analysis (unless the recipe gives every core) and mergekit's merge, into ``out``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    from cpi_merge.fusion.method import register_cpi_method

    if ahead is not None:
        ahead.imported()  # mergekit is in: the analysis may take every core

    recipe = opened.recipe
    given = recipe_boundaries(recipe)
    if opened.vocabulary is not None:
        check_output_vocabulary(
            MergeConfiguration.model_validate(mergekit_recipe(recipe)), opened.vocabulary
        )
    method = register_cpi_method()
    inputs = opened.sources()
    # With an analysis, the checkpoints are hashed behind its first read (one disk read
    # for both); without, at once.
    manifest.hash_inputs((folder for _, _, folder in inputs), hold=given is None)
    cores = None
    if given is None and ahead is not None:
        analysis = ahead.result()
        plan, cores = analysis.plan, analysis.cores
    elif given is None:
        names = [t.name for t in opened.tensors]
        with manifest.following([opened.base, *opened.tasks], names):
            analysis = run_analysis(opened, settings, keep_cores=True)
        plan, cores = analysis.plan, analysis.cores
    else:
        manifest.release()
        plan = plan_from_boundaries(opened, given)
    resolved = resolved_recipe(recipe, plan, _stored_dtype(opened))
    config_source = yaml.safe_dump(resolved, sort_keys=False)
    config = MergeConfiguration.model_validate(resolved)
    options = _without_missing_tokenizer(options, opened.base.path)
    tmp = out.partial
    write_plan_files(plan, tmp, plots=False)  # cpi_plan.json, before the hashes
    with method.configured(cores):
        run_merge(config, str(tmp), options=options, config_source=config_source)
    del cores
    _check_tokenizer(opened.base.path, tmp, options.copy_tokenizer)
    _drop_remote_code(tmp)
    # The pictures are pure Python: drawn beside the merge they slowed it down by
    # holding the GIL; here they overlap with hashing the output, which does not.
    manifest.hash_output(tmp)
    if ahead is None or not ahead.pictures_drawn():
        write_plan_pictures(plan, tmp)  # PNG files: not among the hashed outputs
    card = tmp / "README.md"
    if options.write_model_card and card.exists():
        text = card.read_text(encoding="utf-8")
        card.write_text(
            finish_card(text, tmp.name, out.out.name, plan, recipe),
            encoding="utf-8",
        )
    manifest.write(
        tmp,
        inputs,
        progress=not options.quiet,
        created_by=plan.created_by,
        mergekit=version("mergekit"),
    )
    pause_point("write")  # everything written, not yet in place
    out.commit()
    return plan


def analyze(
    recipe: CpiRecipe | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    plots: bool = True,
    lora_merge_cache: str | None = None,
    lora_merge_dtype: str | None = None,
    **options: Any,
) -> CorePlan:
    """Find every task's exact core region, the overlaps, groups and stage order.

    Args:
        recipe: A :class:`CpiRecipe` or the path of a YAML recipe.
        out_dir: Folder to write ``cpi_plan.json`` and pictures into (created; replaced
            only with ``force``). ``None`` writes nothing.
        force: Replace a non-empty ``out_dir``.
        allow_pickle: Accept pickle checkpoints (unsafe).
        plots: Also write the pictures.
        lora_merge_cache: Where ``base+adapter`` references are merged (kept); default: a
            temporary folder beside ``out_dir``, removed at the end.
        lora_merge_dtype: The dtype adapters are merged in (mergekit's option).
        **options: Fields of :class:`AnalysisOptions` (``seed``, ``order``,
            ``strategy``, ``memory_budget``, ``progress``, ``chunk_entries``).

    Returns:
        The plan.

    Raises:
        RecipeError, CheckpointError, NonFiniteError, DegenerateTaskError, OutputError:
            With the model, tensor and value at fault.

    """
    settings = AnalysisOptions(**options)
    if not isinstance(recipe, CpiRecipe):
        recipe = load_recipe(recipe)
    refs = _references(recipe)
    with (
        reserved_output(out_dir, force=force, inputs=recipe_folders(recipe))
        if out_dir is not None
        else nullcontext()
    ) as out:
        with lora_cache(refs, lora_merge_cache, lora_merge_dtype, beside=out_dir) as lora:
            opened = open_models(recipe, allow_pickle=allow_pickle, lora=lora)
            plan = run_analysis(opened, settings).plan
        if out is not None:
            write_plan_files(plan, out.partial, plots=plots)
            out.commit()
    return plan
