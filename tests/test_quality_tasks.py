"""The quality benchmark's tasks and the exact-match evaluator."""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality.evaluate import exact_match
from benchmarks.quality.tasks import ALIAS, TASKS, examples, pretraining_mixture, split
from benchmarks.tiny_models import char_tokenizer


def solve(prompt: str) -> str:
    """An independent reference solution of every task, from the prompt text alone."""
    tag, rest = prompt.split(":", 1)
    x = rest[:-1]
    task = next(t for t in TASKS if tag in (t, ALIAS[t]))
    if task == "rev":
        return x[::-1]
    if task == "sort":
        return "".join(sorted(x))
    if task == "shift":
        return "".join(chr(ord(c) + 1) for c in x)
    if task == "add":
        a, b = x.split("+")
        return str(int(a) + int(b))
    listing, key = x.split("?")
    return dict(p.split("=") for p in listing.split(","))[key]


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_are_right_and_splits_disjoint(task):
    train, held_out = split(task, 300, 50, seed=3)
    assert all(solve(r["prompt"]) == r["completion"] for r in train + held_out)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert len({r["prompt"] for r in train}) == 300
    assert held_out == split(task, 10, 50, seed=7)[1]  # same held-out set for every seed


def test_pretraining_never_sees_a_held_out_input():
    held = {t: split(t, 0, 40)[1] for t in TASKS}
    mix = pretraining_mixture(list(TASKS), 200, 20, held)
    for task in TASKS:  # same task: no held-out input, under either tag
        held_inputs = {r["prompt"].split(":", 1)[1] for r in held[task]}
        seen = {
            r["prompt"].split(":", 1)[1]
            for r in mix
            if r["prompt"].split(":")[0] in (task, ALIAS[task])
        }
        assert not seen & held_inputs, task
    assert all(solve(r["prompt"]) == r["completion"] for r in mix)
    aliased = sum(r["prompt"].split(":")[0] in ALIAS.values() for r in mix)
    assert aliased == 200 * len(TASKS)


def test_examples_are_seeded():
    assert examples("rev", 5, seed=1) == examples("rev", 5, seed=1)
    assert examples("rev", 5, seed=1) != examples("rev", 5, seed=2)


class Oracle(torch.nn.Module):
    """A fake causal LM that 'generates' a fixed answer per prompt (right or wrong)."""

    def __init__(self, tok, answers):
        super().__init__()
        self.tok, self.answers = tok, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()], skip_special_tokens=True)
            out = self.tok(self.answers[prompt], add_special_tokens=False)["input_ids"]
            out = (out + [self.tok.eos_token_id] + [self.tok.pad_token_id] * 20)[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(out)]))
        return torch.stack(rows)


def test_exact_match_with_left_padding_and_batches():
    tok = char_tokenizer()
    rows = split("rev", 0, 30)[1] + split("kv", 0, 30)[1]
    answers = {r["prompt"]: r["completion"] for r in rows}
    wrong = {r["prompt"] for r in rows[::3]}
    for p in wrong:
        answers[p] = answers[p] + "x"
    acc = exact_match(Oracle(tok, answers), tok, rows, batch_size=7, max_new_tokens=12)
    assert acc == pytest.approx(1 - len(wrong) / len(rows))
