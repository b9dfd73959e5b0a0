"""One strict loader for every YAML config: safe YAML, pydantic, every problem at once.

Recipes and the consolidation/probe configs all go through :func:`validate` (a parsed
mapping) or :func:`load_yaml` (a file), so they share the same error format::

    recipe.yml: 2 problem(s):
      - parameters.tau: Input should be less than or equal to 1 (received 3)
      - models.0.parameters.omegaa: unknown key (allowed here: omega, core_threshold, ...)
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cpi_merge.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)
Hint = Callable[[tuple, dict[str, list[str]]], str]
"""Extra text for an unknown key: ``(location, allowed names by parent) -> text``."""


def allowed_keys(schema: type[BaseModel]) -> dict[str, list[str]]:
    """Field names of ``schema`` and of every nested model, by dotted parent location.

    List items share their parent's location (``models`` for ``models.3.model``).
    """
    found: dict[str, list[str]] = {}

    def walk(model: type[BaseModel], where: str) -> None:
        found[where] = list(model.model_fields)
        for name, field in model.model_fields.items():
            for nested in _models_in(field.annotation):
                walk(nested, f"{where}.{name}" if where else name)

    walk(schema, "")
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def describe(error: dict[str, Any], allowed: dict[str, list[str]], hint: Hint | None) -> str:
    """One line for one pydantic error: where, what, what was received or allowed."""
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "config"
    if error["type"] == "extra_forbidden":
        parent = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
        names = allowed.get(parent, [])
        extra = hint(loc, allowed) if hint else ""
        return f"{where}: unknown key (allowed here: {', '.join(names)}){extra}"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return f"{where}: {error['msg']} (received {error.get('input')!r})"


def validate(
    schema: type[Model],
    data: Any,
    *,
    source: str,
    error: type[ConfigError] = ConfigError,
    hint: Hint | None = None,
    describe_error: Callable[[dict[str, Any]], str | None] | None = None,
) -> Model:
    """Validate a parsed YAML document against ``schema``.

    Args:
        schema: The pydantic model (``extra="forbid"``).
        data: The parsed document.
        source: Where it came from (a file name), for messages.
        error: The exception class to raise.
        hint: Extra text for unknown keys (see :data:`Hint`).
        describe_error: Optional special wording for some errors (None: the default).

    Returns:
        The validated model.

    Raises:
        ConfigError: ``error``, listing every problem, one per line.
    """
    if not isinstance(data, dict):
        raise error(f"{source}: expected a YAML mapping, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        allowed = allowed_keys(schema)
        lines = []
        for e in exc.errors():
            special = describe_error(e) if describe_error else None
            lines.append(special or describe(e, allowed, hint))
        raise error(
            f"{source}: {len(lines)} problem(s):\n" + "\n".join(f"  - {x}" for x in lines)
        ) from None


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (YAML documents make no reference cycles)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""``safe_load``'s loader, in C where PyYAML was built with libyaml."""


def read_yaml(path: str | Path, *, what: str, error: type[ConfigError] = ConfigError) -> Any:
    """Read a YAML file safely (``yaml.safe_load``'s rules; libyaml's parser when present).

    Large recipes: PyYAML's pure-Python parser spent ~17 s on a 120,000-entry model list,
    and Python's garbage collector, scanning the growing document again and again, most
    of the rest; with libyaml and the collector paused while loading it takes ~2 s.

    Raises:
        ConfigError: ``error``: the file is missing or unreadable, or is not YAML.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        with _collector_paused():
            return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_yaml(
    path: str | Path,
    schema: type[Model],
    *,
    what: str = "config",
    error: type[ConfigError] = ConfigError,
    **options: Any,
) -> Model:
    """Read a YAML file and validate it (see :func:`validate` for ``options``).

    Raises:
        ConfigError: ``error``, for an unreadable file or listing every problem.
    """
    return validate(
        schema, read_yaml(path, what=what, error=error), source=str(path), error=error, **options
    )
