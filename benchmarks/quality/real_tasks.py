"""The real-model benchmark's tasks, as chat examples in TRL's conversational format.

Chosen before any result was recorded (benchmarks/RESULTS.md says why): SmolLM2-135M-
Instruct answers each at 0% exact match (it explains instead of answering, and often
gets the answer wrong), and each is a format plus a skill a short fine-tune can align.
The benchmark uses the first three; ``sort`` (the longest sequences) was left out to fit
the hour on 2 CPU cores:

* ``city``: "Which country is Kabul in?" → "Afghanistan". Real data: the IANA time zone
  database (public domain) lists 393 places as ``Area/Place`` zones with their country
  codes (``zone.tab``) and country names (``iso3166.tab``); it ships offline in the
  ``tzdata`` package (a pandas dependency) and in the system's ``/usr/share/zoneinfo``.
* ``add``: "What is 47 + 38?" → "85" (two-digit addition).
* ``words``: "Write 347 in words." → "three hundred forty-seven" (100-999).
* ``sort``: "Sort from smallest to largest: 42, 7, 19, 88" → "7, 19, 42, 88".

Every prompt is a short system message plus the question; held-out prompts are the same
for every seed and never appear in a training pool.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

SYSTEM = "Reply with the answer only."
TASKS = ("city", "add", "words", "sort")
_RENAMED = {  # the tz database's short forms -> the names people write
    "Britain (UK)": "United Kingdom",
    "Korea (South)": "South Korea",
    "Korea (North)": "North Korea",
    "Congo (Dem. Rep.)": "Democratic Republic of the Congo",
    "Congo (Rep.)": "Republic of the Congo",
    "Samoa (American)": "American Samoa",
    "Samoa (western)": "Samoa",
    "Myanmar (Burma)": "Myanmar",
    "Central African Rep.": "Central African Republic",
}


def _zoneinfo() -> Path:
    """The folder holding ``zone.tab`` and ``iso3166.tab``."""
    try:
        import tzdata

        folder = Path(tzdata.__file__).parent / "zoneinfo"
        if (folder / "zone.tab").exists():
            return folder
    except ImportError:
        pass
    folder = Path("/usr/share/zoneinfo")
    if not (folder / "zone.tab").exists():
        raise FileNotFoundError(
            "the time zone database is missing: install the tzdata package (pip install tzdata)"
        )
    return folder


def places() -> list[tuple[str, str]]:
    """(place, country) for every ``Area/Place`` zone of the tz database, in file order."""
    folder = _zoneinfo()
    names = {}
    for line in (folder / "iso3166.tab").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            code, name = line.split("\t")[:2]
            name = _RENAMED.get(name.strip(), name.strip())
            names[code] = name.replace(" & ", " and ").replace("St ", "Saint ")
    rows = []
    for line in (folder / "zone.tab").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        code, _, zone = line.split("\t")[:3]
        parts = zone.split("/")
        if len(parts) == 2 and code in names:
            rows.append((parts[1].replace("_", " "), names[code]))
    return rows


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def in_words(n: int) -> str:
    """English words for 0 <= n <= 999 (``347`` → ``three hundred forty-seven``)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + in_words(rest))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(100, 999)
    return f"Write {n} in words.", in_words(n)


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = rng.sample(range(1, 100), 4)
    question = "Sort from smallest to largest: " + ", ".join(map(str, xs))
    return question, ", ".join(map(str, sorted(xs)))


GENERATED: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "words": _words,
    "sort": _sort,
}


def chat_row(question: str, answer: str) -> dict:
    """One conversational prompt-completion example (TRL's format)."""
    return {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def _city_questions() -> list[tuple[str, str]]:
    return [(f"Which country is {place} in?", country) for place, country in places()]


def split(task: str, n_train: int, n_eval: int, *, seed: int = 0) -> tuple[list, list]:
    """Disjoint train and held-out examples of ``task`` (held-out: the same for every seed).

    ``city`` has 393 questions: the held-out ones are a fixed sample, the train pool is
    the rest in a seeded order (at most ``n_train``). The generated tasks draw distinct
    questions, the train pool excluding every held-out one.

    Raises:
        ValueError: Unknown task, or more examples asked for than the task has.
    """
    if task == "city":
        pool = _city_questions()
        if n_eval + 1 > len(pool):
            raise ValueError(f"city has {len(pool)} questions; n_eval = {n_eval} leaves none")
        random.Random("city:held-out").shuffle(pool)
        held, rest = pool[:n_eval], pool[n_eval:]
        random.Random(f"city:{seed}").shuffle(rest)
        train = rest[:n_train]
    elif task in GENERATED:
        held = _distinct(GENERATED[task], n_eval, random.Random(f"{task}:held-out"), set())
        seen = {q for q, _ in held}
        train = _distinct(GENERATED[task], n_train, random.Random(f"{task}:{seed}"), seen)
    else:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return [chat_row(q, a) for q, a in train], [chat_row(q, a) for q, a in held]


def _distinct(make, n: int, rng: random.Random, exclude: set[str]) -> list[tuple[str, str]]:
    rows, seen = [], set(exclude)
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            return rows
        question, answer = make(rng)
        if question not in seen:
            seen.add(question)
            rows.append((question, answer))
    raise ValueError(f"could not draw {n} distinct questions (the task has fewer)")
