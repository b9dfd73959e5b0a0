"""The ``cpi-consolidate`` configs (Stage 4 and the Stage 1 probes), validated up front.

Stage 4 (consolidation of a fused model)::

    model: merged/                      # the fused checkpoint (cpi-merge output)
    plan: merged/cpi_plan.json          # default: <model>/cpi_plan.json
    data:                               # one entry per task, keyed by its `model` in the plan
      path/to/task_a: data/a.jsonl
    samples_per_task: 256
    seed: 0
    save_stages: true
    freeze: previous_groups             # or none
    stages: plan                        # or single: one stage over all tasks (Full SFT)
    training: {learning_rate: 2.0e-5, max_steps_per_stage: 100, ...}

Stage 1 (probes: one short fine-tune of θ0 per task)::

    model: base/                        # θ0
    data: {math: data/math.jsonl, code: data/code.jsonl}   # task name -> data
    training: {...}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cpi_merge.errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingConfig(_Strict):
    """The usual knobs, mapped onto ``transformers.TrainingArguments`` for every stage."""

    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 2.0e-5
    max_steps_per_stage: Annotated[int, Field(gt=0)] | None = 100
    epochs_per_stage: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    steps_per_task: Annotated[int, Field(gt=0)] | None = None
    """Steps per task in the stage: a stage of n tasks runs n × steps_per_task steps (an
    equal budget per task whatever the grouping)."""
    per_device_train_batch_size: Annotated[int, Field(gt=0)] = 8
    gradient_accumulation_steps: Annotated[int, Field(gt=0)] = 1
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.01
    max_grad_norm: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    max_length: Annotated[int, Field(gt=1)] = 512
    bf16: bool = False
    lr_scheduler_type: str = "linear"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    logging_steps: Annotated[int, Field(gt=0)] = 1
    save_steps: Annotated[int, Field(gt=0)] | None = None
    """Checkpoint every N steps inside a stage (for resume); None: only at stage ends."""
    report_to: str | list[str] = "none"
    optimizer_state: Literal["carry", "reset"] = "carry"
    """``carry``: one AdamW runs through all stages (moments of newly frozen entries are
    zeroed); ``reset``: a fresh AdamW per stage."""

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        lengths = {"max_steps_per_stage", "epochs_per_stage", "steps_per_task"}
        chosen = lengths & {k for k in self.model_fields_set if getattr(self, k) is not None}
        if len(chosen) > 1:
            raise ValueError(f"set one of {sorted(lengths)}, not both ({sorted(chosen)})")
        if chosen and "max_steps_per_stage" not in chosen:
            object.__setattr__(self, "max_steps_per_stage", None)
        if not chosen and self.max_steps_per_stage is None:
            raise ValueError(f"set one of {sorted(lengths)}")
        return self

    def for_stage(self, n_tasks: int) -> TrainingConfig:
        """Return the config with the step budget of a stage of ``n_tasks`` tasks resolved."""
        if self.steps_per_task is None:
            return self
        return self.model_copy(update={"max_steps_per_stage": self.steps_per_task * n_tasks})


class ConsolidationConfig(_Strict):
    """Stage 4: the masked multi-stage fine-tune of a fused model."""

    model: Annotated[str, Field(min_length=1)]
    plan: str | None = None
    data: Annotated[dict[str, str], Field(min_length=1)]
    samples_per_task: Annotated[int, Field(gt=0)] = 256
    seed: int = 0
    save_stages: bool = True
    freeze: Literal["previous_groups", "none"] = "previous_groups"
    stages: Literal["plan", "single"] = "plan"
    training: TrainingConfig = TrainingConfig()

    @property
    def plan_path(self) -> Path:
        """The plan file (default ``<model>/cpi_plan.json``)."""
        return Path(self.plan) if self.plan else Path(self.model) / "cpi_plan.json"


_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ProbeConfig(_Strict):
    """Stage 1: one short fine-tune of θ0 per task."""

    model: Annotated[str, Field(min_length=1)]
    data: Annotated[dict[str, str], Field(min_length=1)]
    samples_per_task: Annotated[int, Field(gt=0)] | None = None
    """Examples per probe (seeded sample); None: all of them."""
    seed: int = 0
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _names(self) -> ProbeConfig:
        bad = [n for n in self.data if not _TASK_NAME.match(n)]
        if bad:
            raise ValueError(
                f"data: task names {bad} must be plain folder names (letters, digits, _ . -)"
            )
        return self


def _load(path: str | Path, schema: type[BaseModel]) -> Any:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read config {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"]) or "config"
            if e["type"] == "extra_forbidden":
                lines.append(f"{where}: unknown key")
            elif e["type"] == "value_error":
                lines.append(e["msg"].removeprefix("Value error, "))
            else:
                lines.append(f"{where}: {e['msg']} (received {e.get('input')!r})")
        raise RecipeError(
            f"{path}: {len(lines)} problem(s):\n" + "\n".join(f"  - {x}" for x in lines)
        ) from None


def load_consolidation_config(path: str | Path) -> ConsolidationConfig:
    """Read and validate a Stage 4 config.

    Raises:
        RecipeError: Unreadable file or every validation problem, listed.
    """
    return _load(path, ConsolidationConfig)


def load_probe_config(path: str | Path) -> ProbeConfig:
    """Read and validate a Stage 1 (probe) config.

    Raises:
        RecipeError: Unreadable file or every validation problem, listed.
    """
    return _load(path, ProbeConfig)
