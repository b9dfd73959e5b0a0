"""The ``cpi`` recipe: a mergekit YAML recipe, validated up front with every problem at once.

A cpi recipe is ordinary mergekit YAML (``mergekit-yaml`` reads it unchanged once the
method is registered). Only the ``models:`` form is supported, and mergekit's
``parameters:`` accept numbers only, so switches are 0/1 numbers::

    merge_method: cpi
    base_model: path-or-hub-id          # θ0
    models:                             # one fine-tune θi per task
      - model: path-or-hub-id
      - model: path-or-hub-id
        parameters: {omega: 0.3}        # per-model SLERP factor
    parameters:
      core_fraction: 0.01               # p, 0 < p <= 1
      tau: 0.1                          # Jaccard threshold, 0 <= tau <= 1
    dtype: bfloat16
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cpi_merge.errors import RecipeError

METHOD_NAME = "cpi"
# mergekit's SLERP treats |cos| > 0.9995 as colinear; the same cut-off as an angle.
DEFAULT_EPSILON = math.acos(0.9995)
DTYPES = ("bfloat16", "float16", "float32")

Fraction = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Switch = Literal[0, 1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ModelParameters(_Strict):
    """Per-model parameters (all optional)."""

    omega: UnitInterval | None = None
    """SLERP factor when this model is folded into the fused non-core entries."""
    core_threshold: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    """A known core threshold t_i; when every task has one, no analysis pass is needed."""
    fusion_base: Switch | None = None
    """1 marks the fusion base θbase (default: the last model)."""
    task: Switch | None = None
    """0 marks a model that is not a task (no core region), e.g. a multi-task SFT model."""


class ModelEntry(_Strict):
    """One entry of ``models:``."""

    model: Annotated[str, Field(min_length=1)]
    parameters: ModelParameters = ModelParameters()

    @property
    def is_task(self) -> bool:
        """Whether this model has a core region (every model unless ``task: 0``)."""
        return self.parameters.task != 0


class GlobalParameters(_Strict):
    """Recipe-wide parameters, with the paper's defaults."""

    core_fraction: Fraction = 0.01
    """p: share of all entries that form each task's core."""
    tau: UnitInterval = 0.1
    """Jaccard threshold: tasks whose cores overlap at least this much share a stage."""
    omega: UnitInterval = 0.5
    """Default SLERP factor for non-core entries."""
    epsilon: Annotated[float, Field(ge=0.0, le=math.pi, allow_inf_nan=False)] = DEFAULT_EPSILON
    """Angle (radians) under which two vectors count as colinear (linear interpolation)."""


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
        duplicates = sorted({r for r in refs if refs.count(r) > 1})
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
        if problems:
            raise ValueError("; ".join(problems))
        return self

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


def _describe(error: dict[str, Any], allowed: dict[str, list[str]]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "recipe"
    if error["type"] == "extra_forbidden":
        parent = ".".join(str(p) for p in error["loc"][:-1] if not isinstance(p, int))
        names = allowed.get(parent, [])
        hint = ""
        if parent == "parameters" and error["loc"][-1] in allowed["models.parameters"]:
            hint = f"; {error['loc'][-1]} is set per model, under models[].parameters"
        return f"{where}: unknown key (allowed here: {', '.join(names)}){hint}"
    if error["type"] == "literal_error" and error["loc"] == ("merge_method",):
        return f"merge_method: {error['input']!r} is not this tool's method (expected 'cpi')"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return f"{where}: {error['msg']} (received {error.get('input')!r})"


_ALLOWED = {
    "": list(CpiRecipe.model_fields),
    "parameters": list(GlobalParameters.model_fields),
    "models": list(ModelEntry.model_fields),
    "models.parameters": list(ModelParameters.model_fields),
}


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
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a YAML mapping, got {type(data).__name__}")
    try:
        return CpiRecipe.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, _ALLOWED) for e in exc.errors()]
        raise RecipeError(
            f"{source}: {len(lines)} problem(s):\n" + "\n".join(f"  - {x}" for x in lines)
        ) from None


def load_recipe(path: str | Path) -> CpiRecipe:
    """Read and validate a recipe file (``yaml.safe_load``).

    Args:
        path: Path to the YAML recipe.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: The file is missing, is not YAML, or fails validation.

    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    return parse_recipe(data, source=str(path))
