"""The ``cpi-consolidate`` configs (Stage 4 and the Stage 1 probes), validated up front.

Stage 4 (consolidation of a fused model)::

    model: merged/                      # the fused checkpoint (cpi-merge output)
    plan: merged/cpi_plan.json          # default: <model>/cpi_plan.json
    data:                               # one entry per task, keyed by its name in the plan
      math: data/math.jsonl
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

``training:`` takes this tool's keys (the step budget per stage, ``max_length``,
``save_steps``, ``optimizer_state``) and any other ``transformers.TrainingArguments``
field under its own name (``learning_rate``, ``bf16``, ``lr_scheduler_type``,
``report_to``, ...), handed to every stage's ``TrainingArguments`` unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cpi_merge.analysis.plan import PLAN_FILE
from cpi_merge.config.strict import load_yaml
from cpi_merge.config.task_names import NAME_PATTERN

DEFAULT_ARGUMENTS = {
    "learning_rate": 2.0e-5,
    "per_device_train_batch_size": 8,
    "weight_decay": 0.01,
    "logging_steps": 1,
    "report_to": "none",
}
"""``TrainingArguments`` values this tool uses when the config does not set them."""
SET_BY_THE_TOOL = frozenset(
    {
        "output_dir",
        "max_steps",
        "num_train_epochs",
        "seed",
        "data_seed",
        "remove_unused_columns",
        "disable_tqdm",
        "save_strategy",
        "use_cpu",
        "optim",
        "do_train",
        "do_eval",
        "eval_strategy",
        "resume_from_checkpoint",
    }
)
"""``TrainingArguments`` fields the stages set themselves (a config may not)."""
_POSITIVE = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
_NON_NEGATIVE = ("weight_decay", "max_grad_norm", "warmup_steps", "logging_steps")


@cache
def training_argument_names() -> frozenset[str]:
    """Every field of ``transformers.TrainingArguments``."""
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


class TrainingConfig(BaseModel):
    """The step budget and this tool's knobs; every other key is a ``TrainingArguments`` field."""

    model_config = ConfigDict(extra="allow", frozen=True)

    max_steps_per_stage: Annotated[int, Field(gt=0)] | None = 100
    epochs_per_stage: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    steps_per_task: Annotated[int, Field(gt=0)] | None = None
    """Steps per task in the stage: a stage of n tasks runs n × steps_per_task steps (an
    equal budget per task whatever the grouping)."""
    max_length: Annotated[int, Field(gt=1)] = 512
    save_steps: Annotated[int, Field(gt=0)] | None = None
    """Checkpoint every N steps inside a stage (for resume); None: only at stage ends."""
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

    @model_validator(mode="after")
    def _arguments_are_training_arguments(self) -> TrainingConfig:
        problems = []
        names = training_argument_names()
        for key, value in self.arguments.items():
            if key == "deepspeed" and value:
                problems.append(
                    "training.deepspeed: DeepSpeed is not supported (exact freezing is not "
                    "implemented for ZeRO's flat parameter partitions); use FSDP2: "
                    "training.fsdp: 'full_shard auto_wrap' with training.fsdp_config: {version: 2}"
                )
            elif key in SET_BY_THE_TOOL:
                problems.append(f"training.{key}: set by cpi-consolidate itself; remove it")
            elif key not in names:
                problems.append(
                    f"training.{key}: unknown key (allowed: {', '.join(type(self).model_fields)}"
                    ", or any transformers TrainingArguments field)"
                )
            elif key in _POSITIVE and not (isinstance(value, int | float) and value > 0):
                problems.append(f"training.{key}: must be a number > 0 (received {value!r})")
            elif key in _NON_NEGATIVE and not (isinstance(value, int | float) and value >= 0):
                problems.append(f"training.{key}: must be a number >= 0 (received {value!r})")
        if not problems:
            try:
                self.training_arguments("/nonexistent", seed=0, progress=False)
            except (ValueError, TypeError) as exc:
                problems.append(f"training: TrainingArguments refuses these values: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def arguments(self) -> dict[str, Any]:
        """The ``TrainingArguments`` fields of this config, with this tool's defaults."""
        return {**DEFAULT_ARGUMENTS, **(self.model_extra or {})}

    def for_stage(self, n_tasks: int) -> TrainingConfig:
        """Return the config with the step budget of a stage of ``n_tasks`` tasks resolved."""
        if self.steps_per_task is None:
            return self
        return self.model_copy(update={"max_steps_per_stage": self.steps_per_task * n_tasks})

    def training_arguments(
        self,
        output_dir: str | Path,
        *,
        seed: int,
        progress: bool,
        ddp_backend: str | None = None,
        sharded: bool = False,
    ):
        """``transformers.TrainingArguments`` for one stage of this config.

        Args:
            output_dir: The stage's checkpoint folder.
            seed: Seed of the stage (data order, dropout).
            progress: Show the Trainer's progress bar.
            ddp_backend: Process-group backend when the config sets none (gloo on CPU).
            sharded: The model is already sharded (FSDP2 at load): the Trainer saves no
                optimizer state of its own (the stage's checkpoint code saves the shards).
                The ``fsdp`` keys are never handed on: this tool shards the model itself.
        """
        import torch
        from transformers import TrainingArguments

        from consolidation.training.sharding import unsharded_arguments

        # The fsdp keys are this tool's to read (training/sharding.py), never the Trainer's;
        # a copy, as TrainingArguments edits an fsdp_config dict in place.
        arguments = copy.deepcopy(unsharded_arguments(self.arguments))
        if sharded:
            arguments["save_only_model"] = True
        return TrainingArguments(
            **{"ddp_backend": ddp_backend, **arguments},
            output_dir=str(output_dir),
            max_steps=self.max_steps_per_stage if self.max_steps_per_stage is not None else -1,
            num_train_epochs=self.epochs_per_stage or 1.0,
            save_strategy="steps" if self.save_steps else "no",
            save_steps=self.save_steps or 500,
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            disable_tqdm=not progress,
            use_cpu=not torch.cuda.is_available(),
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_names(data: dict[str, str]) -> dict[str, str]:
    bad = [n for n in data if not NAME_PATTERN.match(n)]
    if bad:
        raise ValueError(
            f"data: task names {bad} must be plain folder names (letters, digits, _ . -), "
            "as in plans"
        )
    return data


class ConsolidationConfig(_Strict):
    """Stage 4: the masked multi-stage fine-tune of a fused model."""

    model: Annotated[str, Field(min_length=1)]
    plan: str | None = None
    data: Annotated[dict[str, str], Field(min_length=1)]
    """Task name (as in the plan) → JSONL file."""
    samples_per_task: Annotated[int, Field(gt=0)] = 256
    seed: int = 0
    save_stages: bool = True
    freeze: Literal["previous_groups", "none"] = "previous_groups"
    stages: Literal["plan", "single"] = "plan"
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _names(self) -> ConsolidationConfig:
        _plain_names(self.data)
        return self

    @property
    def plan_path(self) -> Path:
        """The plan file (default ``<model>/cpi_plan.json``)."""
        return Path(self.plan) if self.plan else Path(self.model) / PLAN_FILE


class ProbeConfig(_Strict):
    """Stage 1: one short fine-tune of θ0 per task."""

    model: Annotated[str, Field(min_length=1)]
    data: Annotated[dict[str, str], Field(min_length=1)]
    """Task name (becomes the probe's folder name and its name in the recipe) → JSONL."""
    samples_per_task: Annotated[int, Field(gt=0)] | None = None
    """Examples per probe (seeded sample); None: all of them."""
    seed: int = 0
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _names(self) -> ProbeConfig:
        _plain_names(self.data)
        return self


def load_consolidation_config(path: str | Path) -> ConsolidationConfig:
    """Read and validate a Stage 4 config.

    Raises:
        ConfigError: Unreadable file or every validation problem, listed.
    """
    return load_yaml(path, ConsolidationConfig)


def load_probe_config(path: str | Path) -> ProbeConfig:
    """Read and validate a Stage 1 (probe) config.

    Raises:
        ConfigError: Unreadable file or every validation problem, listed.
    """
    return load_yaml(path, ProbeConfig)
