"""Exact freezing under AdamW, against a snapshot: the entries must not move by one bit."""

from __future__ import annotations

import pytest
import torch

from benchmarks.tiny_models import tiny_llama
from consolidation.freezing.freezer import ExactFreezer, as_bits


def setup(seed=0, share=0.05):
    model = tiny_llama(48, hidden=32, layers=2, heads=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    frozen = {}
    for name, p in model.named_parameters():
        n = max(1, int(share * p.numel()))
        frozen[name] = torch.randperm(p.numel(), generator=g)[:n].sort().values
    return model, frozen


def batch(seed, size=4, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 48, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def train(model, optimizer, steps, *, accumulation=2, clip=1.0, bf16=False, seed=0, nan_hook=None):
    norms = []
    for step in range(steps):
        for micro in range(accumulation):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch(seed + 10 * step + micro)).loss / accumulation
            loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_frozen_exact_and_rest_trained(model, before, frozen):
    for name, p in model.named_parameters():
        flat_now, flat_then = p.detach().reshape(-1), before[name].reshape(-1)
        pos = frozen[name].long()
        assert torch.equal(as_bits(flat_now[pos]), as_bits(flat_then[pos])), name
        rest = torch.ones(p.numel(), dtype=torch.bool)
        rest[pos] = False
        assert (flat_now[rest] != flat_then[rest]).any(), f"{name}: nothing trained"


@pytest.mark.parametrize("bf16", [False, True])
def test_adamw_decay_accumulation_clipping(bf16):
    model, frozen = setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer = ExactFreezer(model, frozen).attach(optimizer)
    before = snapshot(model)
    train(model, optimizer, 4, bf16=bf16)
    assert freezer.drift() == 0
    assert_frozen_exact_and_rest_trained(model, before, frozen)


def test_momentum_carried_into_a_stage_that_freezes():
    model, frozen = setup(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    train(model, optimizer, 3)  # stage 1: nothing frozen, moments build up everywhere
    before = snapshot(model)
    ExactFreezer(model, frozen).attach(optimizer)  # stage 2 carries the same optimizer
    train(model, optimizer, 3, seed=100)
    assert_frozen_exact_and_rest_trained(model, before, frozen)


def test_zeroing_gradients_alone_is_not_enough():
    """The naive approach drifts; this is what the freezer exists for (the test can fail)."""
    model, frozen = setup(seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, optimizer, 2)
    before = snapshot(model)

    def zero_grad_only(pos):
        def hook(q):
            q.grad.view(-1).index_fill_(0, pos, 0)

        return hook

    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(zero_grad_only(frozen[name].long()))
    train(model, optimizer, 2, seed=50)
    moved = sum(
        int(
            (
                p.detach().reshape(-1)[frozen[n].long()] != before[n].reshape(-1)[frozen[n].long()]
            ).sum()
        )
        for n, p in model.named_parameters()
    )
    assert moved > 0


def test_nan_gradient_at_a_frozen_entry_does_not_spread():
    model, frozen = setup(seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    name, p = next(iter(model.named_parameters()))
    target = int(frozen[name][0])

    def poison(grad):
        grad = grad.clone()
        grad.view(-1)[target] = float("nan")
        return grad

    p.register_hook(poison)  # before accumulation: as if the backward produced a NaN there
    ExactFreezer(model, frozen).attach(optimizer)
    before = snapshot(model)
    norms = train(model, optimizer, 3)
    assert all(torch.isfinite(torch.tensor(norms)))
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert_frozen_exact_and_rest_trained(model, before, frozen)


def test_clip_norm_does_not_count_frozen_entries():
    model, frozen = setup(seed=4, share=0.3)
    ExactFreezer(model, frozen).attach(torch.optim.SGD(model.parameters(), lr=0.0))
    model(**batch(0)).loss.backward()
    expected = 0.0
    for name, p in model.named_parameters():
        g = p.grad.detach().reshape(-1).clone()
        assert torch.all(g[frozen[name].long()] == 0)
        expected += float((g.double() ** 2).sum())
    got = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    assert got == pytest.approx(expected**0.5, rel=1e-5)


def test_detach_stops_enforcing_and_bad_input():
    model, frozen = setup(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer = ExactFreezer(model, frozen).attach(optimizer)
    freezer.detach()
    train(model, optimizer, 1)
    assert freezer.drift() > 0
    with pytest.raises(KeyError, match="not a parameter"):
        ExactFreezer(model, {"nope": torch.tensor([0])})
    name, p = next(iter(model.named_parameters()))
    with pytest.raises(ValueError, match="outside"):
        ExactFreezer(model, {name: torch.tensor([p.numel()])})


def test_memory_is_a_fraction_of_a_byte_per_parameter():
    model, frozen = setup(share=0.03)
    freezer = ExactFreezer(model, frozen)
    total = sum(p.numel() for p in model.parameters())
    assert freezer.stored_bytes / total <= 0.25  # 3% frozen x (4 B position + 4 B value)
