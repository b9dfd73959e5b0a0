"""A recipe's checkpoints, opened and checked against each other before any tensor is read."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from cpi_merge.config.recipe import CpiRecipe
from cpi_merge.errors import CheckpointError
from cpi_merge.io.checkpoints import Checkpoint, TensorInfo, open_checkpoint
from cpi_merge.io.compatibility import check_compatible
from cpi_merge.io.lora import LoraCache, is_lora
from cpi_merge.io.vocabulary import VocabularyAlignment, align_vocabularies


@dataclass
class OpenedModels:
    """A recipe's checkpoints, opened and checked against each other."""

    recipe: CpiRecipe
    base: Checkpoint
    models: list[Checkpoint]
    """Every model of ``models:``, in recipe order."""
    tensors: list[TensorInfo]
    """The floating-point tensors of the base, in streaming order, with the shapes the
    analysis sees (vocabulary rows cut to the base's tokens with a tokenizer option)."""
    vocabulary: VocabularyAlignment | None = None
    """How vocabulary rows line up by token (recipes with a tokenizer option)."""

    @property
    def tasks(self) -> list[Checkpoint]:
        """The task models (with a core region), in recipe order."""
        return [c for c, m in zip(self.models, self.recipe.models, strict=True) if m.is_task]

    @property
    def task_names(self) -> list[str]:
        """The tasks' short names, in recipe order."""
        return [self.recipe.name_of(m) for m in self.recipe.tasks]

    @property
    def local_folders(self) -> list[str]:
        """Every local folder the recipe reads (a LoRA's base and adapter folders)."""
        return recipe_folders(self.recipe)

    def roles(self) -> list[tuple[str, Checkpoint]]:
        """``(role in the recipe, checkpoint)`` for the base and every model."""
        return [("base_model", self.base)] + [
            (f"models[{i}]", c) for i, c in enumerate(self.models)
        ]

    def sources(self) -> list[tuple[str, str, str]]:
        """``(role, reference, folder)`` of every input as written (for the manifest).

        A LoRA input is recorded by its adapter folder (its base is an input of its own or
        a Hub model); the merged weights are a temporary product.
        """
        rows = []
        for role, ckpt in self.roles():
            folder = ckpt.reference.split("+")[-1] if is_lora(ckpt.reference) else ckpt.path
            rows.append((role, ckpt.reference, folder))
        return rows

    def close(self) -> None:
        """Release every mapped shard (the loaders reopen on the next read)."""
        for ckpt in [self.base, *self.models]:
            ckpt.close()


def recipe_folders(recipe: CpiRecipe) -> list[str]:
    """The local folders a recipe reads (base, models; both parts of a LoRA reference)."""
    refs = [recipe.base_model] + [m.model for m in recipe.models]
    parts = [p for ref in refs for p in ref.split("+")]
    return [p for p in parts if os.path.isdir(p)]


def open_models(
    recipe: CpiRecipe, *, allow_pickle: bool = False, lora: LoraCache | None = None
) -> OpenedModels:
    """Open the base and every model, and check they store the same float tensors.

    Args:
        recipe: The validated recipe.
        allow_pickle: Accept pickle (``.bin``) checkpoints.
        lora: Where ``base+adapter`` references are merged (required if there are any).

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
            opened.append(open_checkpoint(ref, role=role, allow_pickle=allow_pickle, lora=lora))
        except CheckpointError as exc:
            problems.append(str(exc))
            opened.append(None)
    if problems:
        raise CheckpointError("\n".join(problems))
    base, models = opened[0], opened[1:]
    others = list(zip(roles[1:], models, strict=True))
    vocabulary = None
    if recipe.tokenizer_source or recipe.tokenizer:
        vocabulary = align_vocabularies(base, others)
    check_compatible(base, others, vocabulary=vocabulary.tensors if vocabulary else frozenset())
    tensors = base.float_tensors
    if not tensors:
        raise CheckpointError(f"base_model {base.reference!r} stores no floating-point tensors")
    if vocabulary is not None:
        tensors = [replace(t, shape=vocabulary.analysed_shape(t.name, t.shape)) for t in tensors]
    return OpenedModels(recipe, base, models, tensors, vocabulary)
