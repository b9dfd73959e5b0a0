"""Five procedurally generated tasks that share one prompt format and differ by a task tag.

Every example is ``{"prompt": "<tag>:<input>>", "completion": "<output>"}`` over one small
character alphabet. Three tasks transform a letter string (reverse, sort, shift by one),
so they compete for the same copying machinery and interfere; two are different in kind
(two-digit addition, key-value lookup). Train and held-out prompts are disjoint.

Each task also has a one-letter alias tag (``"r:abc>"`` → ``"cba"``): the base is
pretrained mostly on the alias form, so it has the skills, and only a little on the task
tag, which the fine-tunes then align it to — the situation of a pretrained LLM fine-tuned
on a task format, where task vectors stay small.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

LETTERS = "abcdefghij"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _reverse(rng):
    w = _word(rng)
    return w, w[::-1]


def _sort(rng):
    w = _word(rng)
    return w, "".join(sorted(w))


def _shift(rng):
    w = _word(rng)
    return w, "".join(chr(ord(c) + 1) for c in w)


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", str(a + b)


def _lookup(rng):
    keys = rng.sample(LETTERS, 4)
    pairs = {k: str(rng.randint(0, 9)) for k in keys}
    q = rng.choice(keys)
    return ",".join(f"{k}={v}" for k, v in pairs.items()) + f"?{q}", pairs[q]


ALIAS = {"rev": "r", "sort": "o", "shift": "h", "add": "p", "kv": "k"}
TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "rev": _reverse,
    "sort": _sort,
    "shift": _shift,
    "add": _add,
    "kv": _lookup,
}


def examples(
    task: str, n: int, *, seed: int, exclude: set[str] | None = None, alias: bool = False
) -> list[dict]:
    """``n`` distinct examples of ``task`` whose inputs are not in ``exclude``.

    ``exclude`` holds tagged prompts; with ``alias`` the examples use the alias tag
    and are excluded when their tagged form is, so pretraining never sees a held-out input.
    """
    rng = random.Random(f"{task}:{seed}:{'alias' if alias else 'tag'}")
    seen = set(exclude or ())
    rows = []
    while len(rows) < n:
        x, y = TASKS[task](rng)
        tagged = f"{task}:{x}>"
        if tagged in seen:
            continue
        seen.add(tagged)
        rows.append({"prompt": f"{ALIAS[task]}:{x}>" if alias else tagged, "completion": y})
    return rows


def split(task: str, n_train: int, n_eval: int, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint held-out and train examples (the held-out set depends on neither n_train
    nor the seed: every seed is scored on the same prompts)."""
    held_out = examples(task, n_eval, seed=10_000)
    train = examples(task, n_train, seed=seed, exclude={r["prompt"] for r in held_out})
    return train, held_out


def pretraining_mixture(
    tasks, n_alias: int, n_tagged: int, held_out: dict[str, list[dict]], *, seed: int = 0
) -> list[dict]:
    """Mostly alias-tagged examples of every task, plus a few tagged ones (no held-out input)."""
    rows = []
    for task in tasks:
        exclude = {r["prompt"] for r in held_out[task]}
        rows += examples(task, n_alias, seed=100 + seed, exclude=exclude, alias=True)
        rows += examples(task, n_tagged, seed=200 + seed, exclude=exclude)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSONL (one object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
