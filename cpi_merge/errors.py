"""Exceptions raised for bad user input, each naming what failed and where.

All of them derive from ``ValueError`` so pydantic keeps the field location when one
is raised inside a validator, and so callers can catch a single type.
"""

from __future__ import annotations


class CpiError(ValueError):
    """Base class: a problem with the user's input that stops the run."""


class RecipeError(CpiError):
    """The recipe (YAML) is malformed: unknown keys, out-of-range values, bad references."""


class CheckpointError(CpiError):
    """A checkpoint cannot be used: missing, malformed, or inconsistent with the base."""


class NonFiniteError(CheckpointError):
    """A checkpoint holds NaN or Inf entries."""


class DegenerateTaskError(CpiError):
    """A task changes too few entries for its core region to be meaningful."""


class OutputError(CpiError):
    """The output location is unsafe: exists and is not empty, or lies inside an input."""
