"""Checking that every model of a recipe stores the same floating-point tensors as the base."""

from __future__ import annotations

import re
from collections.abc import Sequence

from cpi_merge.errors import CheckpointError
from cpi_merge.io.checkpoints import Checkpoint

_VOCAB = re.compile(r"embed|lm_head|wte|output\.weight$|word_embeddings")


def check_compatible(
    base: Checkpoint,
    others: Sequence[tuple[str, Checkpoint]],
    *,
    vocabulary: frozenset[str] = frozenset(),
) -> None:
    """Require every model to store the same floating-point tensors, with the same shapes.

    Args:
        base: θ0.
        others: ``(role, checkpoint)`` for every other model.
        vocabulary: Vocabulary-indexed tensors, which may differ in their number of rows
            (the recipe has a tokenizer option: rows are matched by token).

    Raises:
        CheckpointError: A tensor is missing, extra, or has another shape; all problems
            of every model are listed.

    """
    expected = {t.name: t.shape for t in base.float_tensors}
    problems = []
    for role, ckpt in others:
        found = {t.name: t.shape for t in ckpt.float_tensors}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        where = f"{role} {ckpt.reference!r}"
        if missing:
            problems.append(f"{where} lacks {len(missing)} tensor(s) of the base: {missing[:5]}")
        if extra:
            hint = " (tied vs untied embeddings?)" if any("lm_head" in n for n in extra) else ""
            problems.append(f"{where} has {len(extra)} tensor(s) the base lacks{hint}: {extra[:5]}")
        for name in sorted(set(expected) & set(found)):
            want, got = expected[name], found[name]
            if want == got or (name in vocabulary and want[1:] == got[1:]):
                continue
            if _VOCAB.search(name) and want[1:] == got[1:] and len(want) == 2:
                problems.append(
                    f"{where}: vocabulary size differs in {name!r}: {got[0]:,} rows, base has "
                    f"{want[0]:,}. Set `tokenizer_source: union` (or `base`, or a model) in "
                    "the recipe, as for mergekit: embedding rows are then compared by token"
                )
            else:
                problems.append(
                    f"{where}: tensor {name!r} has shape {list(got)}, base has {list(want)}"
                )
    if problems:
        raise CheckpointError(
            "models do not match the base:\n" + "\n".join(f"  - {p}" for p in problems)
        )
