"""The real-model benchmark's tasks and its held-out general text."""

from __future__ import annotations

import re

import pytest

from benchmarks.quality.general_text import paragraphs, windows
from benchmarks.quality.real_tasks import SYSTEM, TASKS, in_words, places, split

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip


def read_words(text: str) -> int:
    """An independent parser of English number words (the inverse of ``in_words``)."""
    total = 0
    for part in text.replace("-", " ").split():
        total = total * 100 if part == "hundred" else total + NUMBER_WORDS[part]
    return total


def solve(question: str) -> str | None:
    """The answer computed from the question text alone (None for ``city``)."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Write (\d+) in words\.", question):
        return in_words(int(m[1]))
    if m := re.fullmatch(r"Sort from smallest to largest: (.*)", question):
        return ", ".join(map(str, sorted(int(x) for x in m[1].split(", "))))
    return None


@pytest.mark.parametrize("n", [100, 101, 110, 115, 120, 347, 500, 999, 7, 19, 40])
def test_in_words_reads_back(n):
    assert read_words(in_words(n)) == n


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_right_and_splits_disjoint(task):
    train, held_out = split(task, 120, 60, seed=3)
    assert len(train) == 120 and len(held_out) == 60
    cities = {f"Which country is {place} in?": country for place, country in places()}
    for row in train + held_out:
        system, user = row["prompt"]
        assert system == {"role": "system", "content": SYSTEM} and user["role"] == "user"
        answer = row["completion"][0]["content"]
        expected = cities.get(user["content"]) if task == "city" else solve(user["content"])
        assert answer == expected, user["content"]
    questions = [r["prompt"][1]["content"] for r in train]
    held = {r["prompt"][1]["content"] for r in held_out}
    assert len(set(questions)) == len(questions) and not held & set(questions)
    assert held_out == split(task, 10, 60, seed=7)[1]  # the same held-out set for every seed
    assert split(task, 30, 60, seed=1)[0] != split(task, 30, 60, seed=2)[0]


def test_places_come_from_the_tz_database():
    rows = places()
    assert len(rows) > 300
    assert ("Kabul", "Afghanistan") in rows and ("London", "United Kingdom") in rows
    assert all(country and "&" not in country for _, country in rows)


def test_city_refuses_more_than_it_has():
    with pytest.raises(ValueError, match="city has"):
        split("city", 10, 10_000)
    with pytest.raises(ValueError, match="unknown task"):
        split("nope", 1, 1)


class CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 500 for c in text]}


def test_general_text_is_prose_in_exact_windows():
    texts = paragraphs()
    assert len(texts) > 200
    assert not any("::=" in t or t.startswith(" ") for t in texts)
    got = windows(CharTokenizer(), 6, 50)
    assert [len(w) for w in got] == [50] * 6
    assert got == windows(CharTokenizer(), 6, 50)  # fixed order
    with pytest.raises(ValueError, match="fewer than"):
        windows(CharTokenizer(), 10**6, 100)
