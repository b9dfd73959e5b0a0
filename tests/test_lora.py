"""LoRA adapters (``base+adapter``): merged by mergekit's own path, equal to merge_and_unload."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.commands import analyze
from cpi_merge.errors import CheckpointError
from cpi_merge.io.lora import LoraCache

from helpers.files import load_folder, merged, write_recipe
from helpers.hf_models import make_hf_family


@pytest.fixture
def family(tmp_path):
    """Base + 2 full fine-tunes (bf16) + a LoRA adapter of the base (random, non-zero)."""
    base, tasks = make_hf_family(tmp_path, "llama", dtype=torch.bfloat16, n_tasks=2)
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    return base, tasks, tmp_path / "adapter"


def merged_by_hand(base, adapter, folder):
    """What a user does without cpi-merge: PEFT's merge_and_unload, saved in the same dtype."""
    model = AutoModelForCausalLM.from_pretrained(base)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(folder)
    return folder


def test_a_lora_task_merges_exactly_like_its_merge_and_unload(family, tmp_path):
    base, tasks, adapter = family
    lora = f"{base}+{adapter}"
    recipe = write_recipe(tmp_path / "lora.yml", base, [*tasks, lora], core_fraction=0.05)
    by_hand = merged_by_hand(base, adapter, tmp_path / "by_hand")
    plain = write_recipe(tmp_path / "plain.yml", base, [*tasks, by_hand], core_fraction=0.05)
    a = merged(recipe, tmp_path / "a")
    b = merged(plain, tmp_path / "b")
    fa, fb = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert [t.core_threshold for t in a.plan.tasks] == [t.core_threshold for t in b.plan.tasks]
    assert a.plan.tasks[2].name == "adapter" and "+" in a.plan.tasks[2].model
    manifest = json.loads((tmp_path / "a" / "cpi_manifest.json").read_text())
    entry = manifest["inputs"][3]
    assert entry["path"] == str(adapter) and "adapter_model.safetensors" in entry["files"]
    assert not list(tmp_path.glob(".cpi-lora-cache-*"))  # the temporary merge is gone


def test_the_plan_of_a_lora_task_is_usable_later(family, tmp_path):
    from consolidation.freezing.masks import core_positions

    base, tasks, adapter = family
    recipe = write_recipe(tmp_path / "r.yml", base, [tasks[0], f"{base}+{adapter}"])
    analyze(recipe, tmp_path / "plan", progress=False, plots=False)
    plan = CorePlan.load(tmp_path / "plan")
    positions = core_positions(plan, ["adapter"], lora=LoraCache(str(tmp_path / "cache")))
    assert sum(p.numel() for p in positions.values()) == plan.tasks[1].core_count


def test_bad_adapters_are_refused_before_any_merge(family, tmp_path):
    base, tasks, adapter = family
    (adapter / "adapter_config.json").unlink()
    recipe = write_recipe(tmp_path / "r.yml", base, [tasks[0], f"{base}+{adapter}"])
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        analyze(recipe, progress=False)
    recipe = write_recipe(tmp_path / "r.yml", base, [tasks[0], f"{base}+{tmp_path}/nope"])
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        analyze(recipe, progress=False)
