"""Exceptions raised for bad user input, each naming what failed and where.

All of them derive from ``ValueError`` so pydantic keeps the field location when one
is raised inside a validator, and so callers can catch a single type
(:class:`CpiError`); the command-line tools print any of them as one line and exit 2.
"""

from __future__ import annotations


class CpiError(ValueError):
    """Base class: a problem with the user's input that stops the run."""


class ConfigError(CpiError):
    """A YAML config (recipe, consolidation or probe config) is unreadable or invalid."""


class RecipeError(ConfigError):
    """The merge recipe is malformed: unknown keys, out-of-range values, bad references."""


class CheckpointError(CpiError):
    """A model checkpoint cannot be used: missing, malformed, or inconsistent with the base."""


class NonFiniteError(CheckpointError):
    """A checkpoint holds NaN or Inf entries."""


class DegenerateTaskError(CpiError):
    """A task changes too few entries for its core region to be meaningful."""


class OutputError(CpiError):
    """The output location is unsafe: exists and is not empty, or lies inside an input."""


class DataError(CpiError):
    """A training data file is missing, malformed, or too small."""


class ResumeError(CpiError):
    """A training checkpoint marked complete cannot be resumed from (files missing)."""
