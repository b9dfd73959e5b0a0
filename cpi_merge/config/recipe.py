"""The ``cpi`` recipe: a mergekit YAML recipe, validated up front with every problem at once.

A cpi recipe is ordinary mergekit YAML (``mergekit-yaml`` reads it unchanged once the
method is registered). Only the ``models:`` form is supported, and mergekit's
``parameters:`` accept numbers only, so switches are 0/1 numbers::

    merge_method: cpi
    base_model: path-or-hub-id          # θ0
    models:                             # one fine-tune θi per task
      - model: path-or-hub-id
        name: math                      # optional short name (default: last path part)
      - model: path-or-hub-id
        parameters: {omega: 0.3}        # per-model SLERP factor
    parameters:
      core_fraction: 0.01               # p, 0 < p <= 1
      tau: 0.1                          # Jaccard threshold, 0 <= tau <= 1
    dtype: bfloat16
"""

from __future__ import annotations

import math
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from cpi_merge.config.strict import load_yaml, validate
from cpi_merge.config.task_names import derive_names, name_problems
from cpi_merge.errors import RecipeError

METHOD_NAME = "cpi"
# mergekit's SLERP treats |cos| > 0.9995 as colinear; the same cut-off as an angle.
DEFAULT_EPSILON = math.acos(0.9995)
DEFAULT_CORE_FRACTION = 0.01
DEFAULT_TAU = 0.1
DTYPES = ("bfloat16", "float16", "float32")
TIE_HASH_LIMIT = 1 << 53
"""Tie hashes are below 2^53, so a recipe (float64 numbers) carries them exactly."""


def _not_bool(value: Any) -> Any:
    """YAML's ``true`` is not a number: refuse it where one is expected (mergekit coerces)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


Number = BeforeValidator(_not_bool)
Fraction = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False), Number]
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False), Number]
Switch = Annotated[Literal[0, 1], Number]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ModelParameters(_Strict):
    """Per-model parameters (all optional)."""

    omega: UnitInterval | None = None
    """SLERP factor when this model is folded into the fused non-core entries."""
    core_threshold: Annotated[float, Field(gt=0.0, allow_inf_nan=False), Number] | None = None
    """A known core threshold t_i; when every task has one, no analysis pass is needed."""
    tie_base_abs: Annotated[float, Field(ge=0.0, allow_inf_nan=True), Number] | None = None
    """With core_threshold: the tie rule's |θ0| bound (absent: every entry at t_i is in)."""
    tie_hash: Annotated[int, Field(ge=0, lt=TIE_HASH_LIMIT), Number] | None = None
    """With tie_base_abs: the tie rule's hash bound."""
    fusion_base: Switch | None = None
    """1 marks the fusion base θbase (default: the last model)."""
    task: Switch | None = None
    """0 marks a model that is not a task (no core region), e.g. a multi-task SFT model."""


class ModelEntry(_Strict):
    """One entry of ``models:``."""

    model: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)] | None = None
    """Short name used in plans, reports and consolidation data (default: derived)."""
    parameters: ModelParameters = ModelParameters()

    @property
    def is_task(self) -> bool:
        """Whether this model has a core region (every model unless ``task: 0``)."""
        return self.parameters.task != 0


class GlobalParameters(_Strict):
    """Recipe-wide parameters, with the paper's defaults."""

    core_fraction: Fraction = DEFAULT_CORE_FRACTION
    """p: share of all entries that form each task's core."""
    tau: UnitInterval = DEFAULT_TAU
    """Jaccard threshold: tasks whose cores overlap at least this much share a stage."""
    omega: UnitInterval = 0.5
    """Default SLERP factor for non-core entries."""
    epsilon: Annotated[float, Field(ge=0.0, le=math.pi, allow_inf_nan=False), Number] = (
        DEFAULT_EPSILON
    )
    """Angle (radians) under which two vectors count as colinear (linear interpolation)."""
    exact_k: Switch = 1
    """1: every core holds exactly k entries (the documented tie rule decides among the
    entries at the threshold); 0: every entry at the threshold is in the core."""
    tie_seed: Annotated[int, Field(ge=0, lt=1 << 62), Number] = 0
    """Seed of the tie rule's hash."""
    base_vocab_rows: Annotated[int, Field(gt=0), Number] | None = None
    """Written by ``cpi-merge`` with a tokenizer option: the leading embedding rows that are
    the base's tokens (the only rows a core can hold)."""


class CpiRecipe(_Strict):
    """A validated ``merge_method: cpi`` recipe."""

    merge_method: Literal["cpi"]
    base_model: Annotated[str, Field(min_length=1)]
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    parameters: GlobalParameters = GlobalParameters()
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    out_dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _check_models(self) -> CpiRecipe:
        problems = []
        refs = [m.model for m in self.models]
        duplicates = sorted(r for r, n in Counter(refs).items() if n > 1)
        if duplicates:
            problems.append(f"models: listed more than once: {duplicates}")
        if self.base_model in refs:
            problems.append(
                f"models: the base model {self.base_model!r} is also listed as a model; "
                "list it only under base_model (a task identical to the base has no core)"
            )
        if not any(m.is_task for m in self.models):
            problems.append("models: no task model (every model has task: 0)")
        flagged = [m.model for m in self.models if m.parameters.fusion_base == 1]
        if len(flagged) > 1:
            problems.append(f"models: fusion_base: 1 is set on {len(flagged)} models {flagged}")
        for i, m in enumerate(self.models):
            p = m.parameters
            if p.tie_hash is not None and p.tie_base_abs is None:
                problems.append(f"models[{i}].parameters: tie_hash needs tie_base_abs")
            if p.tie_base_abs is not None and p.core_threshold is None:
                problems.append(f"models[{i}].parameters: tie_base_abs needs core_threshold")
        if not duplicates:
            problems += name_problems(self.names, refs)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @cached_property
    def names(self) -> list[str]:
        """Every model's short name, in recipe order (given, or derived from its reference)."""
        return derive_names([m.model for m in self.models], [m.name for m in self.models])

    def name_of(self, entry: ModelEntry) -> str:
        """The short name of one of this recipe's model entries."""
        return self.names[self.models.index(entry)]

    @property
    def tasks(self) -> list[ModelEntry]:
        """The task models (those with a core region), in recipe order."""
        return [m for m in self.models if m.is_task]

    @property
    def fusion_base(self) -> ModelEntry:
        """θbase: the model flagged ``fusion_base: 1``, else the last model."""
        for m in self.models:
            if m.parameters.fusion_base == 1:
                return m
        return self.models[-1]


def torch_dtype(name: str | None):
    """The torch dtype of a recipe ``dtype`` name (None stays None)."""
    import torch

    return None if name is None else getattr(torch, name)


_PER_MODEL = list(ModelParameters.model_fields)


def _hint(loc: tuple, allowed: dict[str, list[str]]) -> str:
    if len(loc) == 2 and loc[0] == "parameters" and loc[1] in _PER_MODEL:
        return f"; {loc[1]} is set per model, under models[].parameters"
    return ""


def _special(error: dict[str, Any]) -> str | None:
    if error["type"] == "literal_error" and error["loc"] == ("merge_method",):
        return f"merge_method: {error['input']!r} is not this tool's method (expected 'cpi')"
    return None


def parse_recipe(data: Any, *, source: str = "recipe") -> CpiRecipe:
    """Validate a recipe given as a Python mapping.

    Args:
        data: The parsed YAML document.
        source: Where it came from, for error messages.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: Listing every problem found, one per line.

    """
    return validate(
        CpiRecipe, data, source=source, error=RecipeError, hint=_hint, describe_error=_special
    )


def load_recipe(path: str | Path) -> CpiRecipe:
    """Read and validate a recipe file (``yaml.safe_load``).

    Args:
        path: Path to the YAML recipe.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: The file is missing, is not YAML, or fails validation.

    """
    return load_yaml(
        path,
        CpiRecipe,
        what="recipe",
        error=RecipeError,
        hint=_hint,
        describe_error=_special,
    )
