"""One-pass greedy exact match: the same verdict as decoding, padding and offsets included."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks.quality.chat_eval import encode, score_chat
from benchmarks.quality.general_text import general_loss
from benchmarks.tiny_models import char_tokenizer, tiny_llama

EOS = ord("z")


class OrdTokenizer:
    """Characters as ids (their code point); EOS is ``z``; no special tokens added."""

    eos_token_id = EOS
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


class NextLetter(torch.nn.Module):
    """A fake causal LM whose greedy next token is always the current token + 1."""

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        assert position_ids[attention_mask.bool()].min() == 0  # positions start at each row
        logits = torch.nn.functional.one_hot((input_ids + 1) % 200, 200).float() * 10
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def rows(*pairs):
    return [{"prompt": p, "completion": c} for p, c in pairs]


def test_a_row_is_right_exactly_when_greedy_decoding_writes_it_and_stops():
    data = rows(
        ("abc", "de"),  # c -> d -> e, then f... but EOS is z: decoding goes on: wrong
        ("uvw", "xy"),  # w -> x -> y -> z (EOS): right
        ("stuvw", "xy"),  # longer prompt in the same batch (left padding): right
        ("uvw", "xq"),  # wrong second token
    )
    got = score_chat(NextLetter(), OrdTokenizer(), data, batch_size=3)
    assert got.exact_match == pytest.approx(2 / 4)
    assert score_chat(NextLetter(), OrdTokenizer(), data[1:3], batch_size=1).exact_match == 1.0


def test_the_answer_ends_at_the_first_end_token():
    [(prompt, answer)] = encode(rows(("uvw", "xyzzz")), OrdTokenizer())
    assert prompt == [ord(c) for c in "uvw"] and answer == [ord("x"), ord("y"), EOS]


@torch.no_grad()
def brute_force(model, tokenizer, data) -> tuple[float, float]:
    """Greedy verdict and answer loss from one unpadded forward pass per row."""
    correct, loss, count = 0, 0.0, 0
    for prompt, answer in encode(data, tokenizer):
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        target = torch.tensor(answer)
        correct += bool((logits.argmax(-1) == target).all())
        loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += len(answer)
    return correct / len(data), loss / count


def test_a_real_model_with_left_padding_matches_unpadded_passes():
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), hidden=32, layers=2, heads=2, seed=0).eval()
    with torch.no_grad():  # make some rows right: take the model's own greedy answers
        data = []
        for prompt in ["ab:", "hello:", "x", "kv:a=1,b=2?a>"]:
            ids = tokenizer(prompt)["input_ids"]
            out = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=0
            )
            data.append({"prompt": prompt, "completion": tokenizer.decode(out[0, len(ids) :])})
        tokenizer.eos_token_id = int(model(input_ids=out).logits[0, -1].argmax())
    data += rows(("ab:", "zz"), ("q", "abc"))
    expected = brute_force(model, tokenizer, data)
    got = score_chat(model, tokenizer, data, batch_size=4)
    assert got.exact_match == pytest.approx(expected[0])
    assert got.answer_loss == pytest.approx(expected[1], rel=1e-5)
    assert got.exact_match >= 1 / len(data)


def test_general_loss_is_the_mean_next_token_loss():
    model = tiny_llama(40, hidden=16, layers=1, heads=2, seed=1).eval()
    windows = [[1, 5, 7, 9, 3], [2, 2, 8, 8, 4], [6, 1, 1, 1, 1]]
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=torch.tensor([w])).logits[0, :-1]
            total += float(
                torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum")
            )
    got = general_loss(model, windows, batch_size=2)
    assert got == pytest.approx(total / 12, rel=1e-5) and math.isfinite(got)
