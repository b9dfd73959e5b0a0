"""Community checkpoints of a real pretrained LLM: bf16 ties, added tokens, LoRA, tied heads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.commands import analyze

from helpers.files import load_folder, merged
from helpers.real_world import TOOL
from helpers.references import ref_hash

pytestmark = pytest.mark.real
EMBED = "model.embed_tokens.weight"
TEXT = (Path(__file__).parent / "general_text.txt").read_text()


def recipe(world, tmp_path, lora: str | None = None, **top) -> Path:
    """Base + the four fine-tunes: sharded bf16, fp16, an added token, a LoRA adapter."""
    models = [
        {"model": str(world["upper"])},
        {"model": str(world["reverse"])},
        {"model": str(world["tool"])},
        {"model": lora or f"{world['base']}+{world['adapter']}", "name": "first"},
    ]
    doc = {
        "merge_method": "cpi",
        "base_model": str(world["base"]),
        "models": models,
        "parameters": {"core_fraction": 0.01, "tau": 0.1},
        "tokenizer_source": "union",
        **top,
    }
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def plans(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    path = recipe(world, tmp)
    return {
        s: analyze(path, progress=False, plots=False, strategy=s) for s in ("buffer", "histogram")
    }


def test_bf16_ties_give_exactly_k_entries_by_the_tie_rule(world, plans):
    buffer, histogram = plans["buffer"], plans["histogram"]
    sums = {"relative_update_norm", "core_energy_share"}  # float sums: close, not equal
    assert [t.model_dump(exclude=sums) for t in buffer.tasks] == [
        t.model_dump(exclude=sums) for t in histogram.tasks
    ]
    for a, b in zip(buffer.tasks, histogram.tasks):
        assert a.core_energy_share == pytest.approx(b.core_energy_share, rel=1e-4)
    assert buffer.intersections == histogram.intersections
    for task in buffer.tasks:
        assert task.core_count == buffer.k  # not 1.2-2% of the model: exactly p
    # the bf16/fp16 full fine-tunes put more than k entries at t: the rule decides
    ties = [t for t in buffer.tasks if t.at_threshold > t.taken_at_threshold > 0]
    assert len(ties) >= 2


def _aligned(folder, rows):
    tensors = load_folder(folder)
    return {n: (v[:rows] if n == EMBED else v) for n, v in tensors.items()}


def test_the_cores_follow_the_rule_entry_by_entry(world, plans):
    """An independent count over the real checkpoints: exactly k entries meet the rule."""
    plan = plans["buffer"]
    base = _aligned(world["base"], plan.vocabulary_rows)
    for task in plan.tasks[:3]:  # the full fine-tunes (the LoRA task is checked by merge)
        b = task.boundary(plan.tie_seed)
        other = _aligned(world[task.name], plan.vocabulary_rows)
        above = at_a = 0
        hashed = []
        for name, theta0 in base.items():
            t0 = theta0.float().reshape(-1)
            delta = (other[name].float().reshape(-1) - t0).abs()
            above += int((delta > b.threshold).sum())
            tied = delta == b.threshold
            at_a += int((tied & (t0.abs() < b.tie_base_abs)).sum())
            for j in (tied & (t0.abs() == b.tie_base_abs)).nonzero().squeeze(1).tolist():
                hashed.append(ref_hash(plan.tie_seed, name, j) <= b.tie_hash)
        assert above + at_a + sum(hashed) == plan.k, task.name


def _perplexity(model, tokenizer) -> float:
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return math.exp(float(model(input_ids=ids, labels=ids).loss))


def _chat(model, tokenizer, question: str, tokens: int = 12) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0][ids.shape[1] :])


@pytest.fixture(scope="module")
def fused(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    merged(recipe(world, tmp), tmp / "out")
    return tmp / "out"


def test_the_merged_model_loads_speaks_and_knows_the_added_token(world, fused):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(fused)
    tokenizer = AutoTokenizer.from_pretrained(fused)
    rows = model.get_input_embeddings().weight.shape[0]
    assert model.config.vocab_size == rows == len(tokenizer) == 49_153
    tool = tokenizer.convert_tokens_to_ids(TOOL)
    assert tokenizer(TOOL, add_special_tokens=False)["input_ids"] == [tool] == [49_152]
    # the added token's row is the one task `tool` trained (its donor), and it is generated
    fused_rows = load_folder(fused)[EMBED]
    assert torch.equal(fused_rows[tool], load_folder(world["tool"])[EMBED][tool])
    with torch.no_grad():
        logits = model(torch.tensor([[tool]])).logits
    assert torch.isfinite(logits).all()
    boosted = model.generate(
        torch.tensor([[tool]]),
        max_new_tokens=1,
        do_sample=False,
        sequence_bias={(tool,): 100.0},
    )
    assert tokenizer.decode(boosted[0][1:]) == TOOL
    assert _chat(model, tokenizer, "What is the capital of France?").strip()
    # tied weights stay tied: the output stores the embedding once, like the input
    keys = set(load_folder(fused))
    assert EMBED in keys and "lm_head.weight" not in keys


def test_the_merge_keeps_the_model_a_language_model(world, fused):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world["base"])
    base = _perplexity(AutoModelForCausalLM.from_pretrained(world["base"]), tokenizer)
    after = _perplexity(AutoModelForCausalLM.from_pretrained(fused), tokenizer)
    assert base < 60  # a real pretrained model reads English
    assert after < 1.5 * base, (base, after)  # a broken merge explodes perplexity


def test_run_merge_from_the_resolved_recipe_gives_the_same_model(fused, tmp_path):
    """The recipe's numbers (t, a, h) reproduce the cores in every tensor, ties included."""
    resolved = yaml.safe_load((fused / "mergekit_config.yml").read_text())
    path = tmp_path / "resolved.yml"
    path.write_text(yaml.safe_dump(resolved))
    merged(path, tmp_path / "again")
    a, b = load_folder(fused), load_folder(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_task_equals_its_merge_and_unload(world, fused, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    by_hand = tmp_path / "by_hand"
    model = AutoModelForCausalLM.from_pretrained(world["base"])
    PeftModel.from_pretrained(model, world["adapter"]).merge_and_unload().save_pretrained(by_hand)
    merged(recipe(world, tmp_path, lora=str(by_hand)), tmp_path / "out")
    a, b = load_folder(fused), load_folder(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_consolidation_freezes_cores_bit_for_bit_on_the_real_model(world, fused, tmp_path):
    from consolidation.freezing.freezer import as_bits
    from consolidation.freezing.masks import core_positions
    from consolidation.stages import consolidate
    from cpi_merge.io.lora import LoraCache

    plan = CorePlan.load(fused)
    data = {t: str(world["data"] / f"{t}.jsonl") for t in plan.task_names}
    cfg = {
        "model": str(fused),
        "data": data,
        "samples_per_task": 8,
        "training": {
            "learning_rate": 1e-4,
            "steps_per_task": 1,
            "per_device_train_batch_size": 2,
            "max_length": 48,
            "weight_decay": 0.1,
        },
    }
    path = tmp_path / "cons.yml"
    path.write_text(yaml.safe_dump(cfg))
    records = consolidate(path, tmp_path / "out", progress=False)
    assert len(records) == len(plan.groups)
    lora = LoraCache(str(tmp_path / "lora"))
    before = load_file(str(fused / "model.safetensors"))
    frozen_total = 0
    for k in range(2, len(records) + 1):
        earlier = [t for g in plan.groups[: k - 1] for t in g]
        frozen = core_positions(plan, earlier, lora=lora)
        stage = load_file(str(tmp_path / "out" / "stages" / str(k) / "model.safetensors"))
        prev = (
            before
            if k == 2
            else load_file(str(tmp_path / "out" / "stages" / str(k - 1) / "model.safetensors"))
        )
        for name, at in frozen.items():
            now, was = stage[name].reshape(-1)[at.long()], prev[name].reshape(-1)[at.long()]
            assert torch.equal(as_bits(now), as_bits(was)), name
        frozen_total += sum(p.numel() for p in frozen.values())
        moved = sum(int((stage[n] != prev[n]).sum()) for n in stage)
        assert moved > 0  # and the rest trains
    assert frozen_total > 0
    report = json.loads((tmp_path / "out" / "consolidation_report.json").read_text())
    assert report["stages"][-1]["frozen_entries"] == records[-1].frozen_entries
    keys = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert EMBED in keys and "lm_head.weight" not in keys  # tied, as the input
