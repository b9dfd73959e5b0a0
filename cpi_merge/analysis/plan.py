"""``cpi_plan.json``: the versioned record of an analysis, read by the merge and consolidation.

Tasks are identified by their short name (the recipe's ``name:``, or derived from the
reference); models are recorded as resolved references (local folders as absolute
paths), so a plan read from another directory still finds them. Thresholds are float32
values; JSON stores them as the shortest decimal that reads back to the same double
(exact for a float32), plus the float32 bit pattern in hex so that any reader can check
it got the exact value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from cpi_merge.analysis.core_rule import CoreBoundary
from cpi_merge.analysis.grouping import StageOrder
from cpi_merge.analysis.radix import float32_bits, float32_from_bits
from cpi_merge.errors import CpiError

SCHEMA_VERSION = 2
PLAN_FILE = "cpi_plan.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorRecord(_Record):
    """One analysed tensor: name and shape as stored in the base checkpoint."""

    name: str
    shape: list[int]
    numel: int


class TaskCore(_Record):
    """One task's core region."""

    name: str
    """The task's short name (used by groups, reports and consolidation data keys)."""
    model: str
    """The resolved reference of its checkpoint (local folders as absolute paths)."""
    core_threshold: float
    """t_i: the exact k-th largest |θi − θ0| (a float32 value)."""
    core_threshold_bits: str
    """t_i's float32 bit pattern, ``0x…``."""
    tie_base_abs: float | None = None
    """The tie rule's |θ0| bound (a float32 value); None: every entry at t_i is in the core."""
    tie_hash: int | None = None
    """The tie rule's hash bound (with ``tie_base_abs``)."""
    core_count: int | None = None
    """Entries in the core (k with the tie rule); None if not analysed."""
    at_threshold: int | None = None
    """Entries with |θi − θ0| == t_i, anywhere in the model."""
    taken_at_threshold: int | None = None
    """How many of those the core holds (what the tie rule decided)."""
    relative_update_norm: float | None = None
    """‖θi − θ0‖ / ‖θ0‖ over the analysed tensors."""
    core_energy_share: float | None = None
    """Σ over the core of (θi − θ0)² / Σ over all analysed entries."""
    energy_curve: list[tuple[float, float]] | None = None
    """Points (share of entries, share of the update energy they hold), for the
    largest-|Δ| entries, near 0.1% ... 50% of the entries (estimated from a sample unless
    the plan's ``energy_curve_sample`` is None)."""
    p_holding: dict[str, float] | None = None
    """The smallest share of entries holding half ("0.5") and 90% ("0.9") of the energy."""
    per_tensor: dict[str, int] | None = None
    """Core entries per tensor name; None if not analysed."""

    @model_validator(mode="after")
    def _bits_match(self) -> TaskCore:
        if float32_bits(self.core_threshold) != int(self.core_threshold_bits, 16):
            raise ValueError(
                f"task {self.name!r}: core_threshold {self.core_threshold!r} does not match "
                f"its bit pattern {self.core_threshold_bits}"
            )
        if (self.tie_base_abs is None) != (self.tie_hash is None):
            raise ValueError(f"task {self.name!r}: tie_base_abs and tie_hash go together")
        return self

    def boundary(self, seed: int) -> CoreBoundary:
        """The core's boundary (the tie rule hashes with ``seed``, the plan's tie_seed)."""
        if self.tie_base_abs is None:
            return CoreBoundary(self.core_threshold, seed=seed)
        return CoreBoundary(self.core_threshold, self.tie_base_abs, self.tie_hash, seed=seed)


class CorePlan(_Record):
    """The result of ``cpi-analyze``: cores, their overlaps, groups and stage order."""

    schema_version: Literal[2] = SCHEMA_VERSION
    source: Literal["analysis", "recipe"] = "analysis"
    """``analysis``: computed by cpi-analyze; ``recipe``: thresholds given in the recipe, so
    counts, overlaps and groups were not computed (those fields are null)."""
    created_by: str
    base_model: str
    """θ0's resolved reference."""
    dtype: str | None
    total_parameters: int
    """D: entries of all floating-point tensors stored in the base (tied weights once)."""
    k: int
    """floor(core_fraction × D)."""
    core_fraction: float
    tau: float
    exact_k: bool = True
    """Cores of exactly k entries (the tie rule), or every entry at the threshold."""
    tie_seed: int = 0
    seed: int | None = None
    order: StageOrder | None = None
    strategy: Literal["buffer", "histogram"] | None = None
    strategy_reason: str | None = None
    """Why that strategy ran: asked for, or ``auto``'s memory arithmetic."""
    tensors: list[TensorRecord]
    """The analysed tensors, with the shapes the analysis saw."""
    vocabulary_rows: int | None = None
    """With a tokenizer option: the leading rows of ``vocabulary_tensors`` (the base's
    tokens) that were analysed, compared by token; the other rows are in no core."""
    vocabulary_tensors: list[str] | None = None
    tasks: list[TaskCore]
    intersections: list[list[int]] | None = None
    """``|Ci ∩ Cj|``, N × N; the diagonal is ``core_count``."""
    jaccard: list[list[float]] | None = None
    groups: list[list[str]] | None = None
    """Task names per group, groups in stage order."""
    task_cosine: list[list[float]] | None = None
    """cos(θi − θ0, θj − θ0) for every pair of tasks."""
    sign_conflict_rate: list[list[float | None]] | None = None
    """Share of Ci ∩ Cj where the two updates have opposite signs (None: no overlap)."""
    verdict: list[str] | None = None
    """Can merging and isolation help here: short lines with their reasons."""
    energy_curve_sample: int | None = None
    """Entries per task the energy curves and ``p_holding`` were estimated from; None
    when they are exact (``--energy-curve``, or a model no larger than the sample)."""

    @model_validator(mode="after")
    def _names_are_known(self) -> CorePlan:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names are not unique: {names}")
        unknown = sorted({n for g in self.groups or [] for n in g} - set(names))
        if unknown:
            raise ValueError(f"groups name tasks {unknown} that the plan does not have")
        return self

    @property
    def analysed(self) -> bool:
        """Whether counts, overlaps and groups were computed."""
        return self.source == "analysis"

    @property
    def task_names(self) -> list[str]:
        """The tasks' names, in recipe order."""
        return [t.name for t in self.tasks]

    @property
    def thresholds(self) -> dict[str, float]:
        """``{task name: t_i}``."""
        return {t.name: t.core_threshold for t in self.tasks}

    @property
    def boundaries(self) -> dict[str, CoreBoundary]:
        """``{task name: its core's boundary}`` (threshold and tie rule)."""
        return {t.name: t.boundary(self.tie_seed) for t in self.tasks}

    def task(self, name: str) -> TaskCore:
        """The task called ``name``.

        Raises:
            CpiError: No such task (the message lists the plan's tasks).
        """
        for t in self.tasks:
            if t.name == name:
                return t
        raise CpiError(f"task {name!r} is not in the plan (its tasks are {self.task_names})")

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (UTF-8, indented)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.model_dump_json(indent=1))
            f.write("\n")

    @classmethod
    def load(cls, path: str | Path) -> CorePlan:
        """Read and validate a plan file (a folder means ``<folder>/cpi_plan.json``).

        Raises:
            CpiError: Missing file, unknown schema version, or invalid content.

        """
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CpiError(f"cannot read plan {str(path)!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise CpiError(f"{path}: not valid JSON ({exc})") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise CpiError(
                f"{path}: plan schema_version {version!r} is not supported "
                f"(this cpi-merge reads version {SCHEMA_VERSION}); rerun cpi-analyze"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise CpiError(f"{path}: invalid plan:\n{exc}") from None


def threshold_record(value: float) -> tuple[float, str]:
    """Return ``(value, bits)`` for a float32 threshold, checking it is a float32."""
    bits = float32_bits(value)
    if float32_from_bits(bits) != value:
        raise ValueError(f"{value!r} is not exactly representable as float32")
    return value, f"0x{bits:08x}"
