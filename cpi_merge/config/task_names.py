"""One short name per model of a recipe: what plans, reports, model cards and data keys use.

A name is given in the recipe (``models[].name``, which mergekit ignores) or derived from
the reference: its last path component (``runs/math/`` → ``math``, ``org/llama-code@v2``
→ ``llama-code``). When two derived names collide, more of each path is kept
(``a/final`` and ``b/final`` → ``a_final`` and ``b_final``). Names are plain
(letters, digits, ``_ . -``), so they also serve as folder names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _components(reference: str) -> list[str]:
    path = reference.split("@", 1)[0] if not reference.startswith((".", "/")) else reference
    parts = [p for p in re.split(r"[/\\]+", path) if p not in ("", ".", "..")]
    return [re.sub(r"[^A-Za-z0-9_.-]", "_", p).lstrip("_.-") or "model" for p in parts] or ["model"]


def derive_names(references: Sequence[str], given: Sequence[str | None] | None = None) -> list[str]:
    """Short unique names for references (see the module docstring).

    Args:
        references: Model references, all different.
        given: Names set in the recipe (None where not set): kept as they are, and a
            derived name that clashes with one grows too.

    Returns:
        One name per reference, in order; unique whenever the references' paths differ.
    """
    given = list(given) if given is not None else [None] * len(references)
    parts = [_components(r) for r in references]
    depth = [1] * len(references)
    while True:
        names = [g or "_".join(p[-d:]) for g, p, d in zip(given, parts, depth, strict=True)]
        clashes = {n for n, c in Counter(names).items() if c > 1}
        grow = [
            i
            for i, n in enumerate(names)
            if n in clashes and given[i] is None and depth[i] < len(parts[i])
        ]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def name_problems(names: Sequence[str], references: Sequence[str]) -> list[str]:
    """Problems with a final list of names: not plain, or used twice."""
    problems = [
        f"models[{i}] ({ref!r}): name {name!r} must be letters, digits, '_', '.', '-' "
        "(it is also used as a folder name)"
        for i, (name, ref) in enumerate(zip(names, references, strict=True))
        if not NAME_PATTERN.match(name)
    ]
    for name, count in Counter(names).items():
        if count > 1:
            users = [r for n, r in zip(names, references, strict=True) if n == name]
            problems.append(
                f"models: {count} models are named {name!r} ({users}); give each a distinct `name:`"
            )
    return problems
