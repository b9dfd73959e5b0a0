"""cpi-merge end to end through mergekit, on tiny models of several architectures."""

from __future__ import annotations

import pytest
import torch
import yaml

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.config.recipe import DEFAULT_EPSILON
from cpi_merge.errors import CpiError

from helpers.files import load_folder, merged, write_recipe
from helpers.hf_models import make_hf_family
from helpers.references import assert_plan_matches, brute_force, ref_fuse


def check_against_reference(base, models, out, plan, *, omegas, fusion_base, tasks_mask):
    inputs = [load_folder(base)] + [load_folder(m) for m in models]
    result = load_folder(out)
    rules = iter(plan.boundaries[m.name] for m, is_task in zip(models, tasks_mask) if is_task)
    per_model_t = [next(rules) if is_task else None for is_task in tasks_mask]
    assert set(result) == set(inputs[0])
    for name, got in result.items():
        owner, ref = ref_fuse(
            inputs[0][name],
            [m[name] for m in inputs[1:]],
            per_model_t,
            omegas,
            fusion_base,
            DEFAULT_EPSILON,
            name=name,
        )
        dtype = inputs[1 + fusion_base][name].dtype
        assert got.dtype == dtype, name
        for i, m in enumerate(inputs[1:]):
            mine = torch.from_numpy(owner == i)
            assert torch.equal(got[mine], m[name][mine]), (name, i)  # bit-exact core
        rest = torch.from_numpy(owner < 0)
        r = torch.from_numpy(ref)[rest]
        rms = float(r.pow(2).mean().sqrt()) if r.numel() else 0.0
        tol = 4 * torch.finfo(dtype).eps * (r.abs() + rms)  # float32 maths, then rounding
        assert torch.all((got[rest].double() - r).abs() <= tol + 1e-30), name


@pytest.mark.parametrize(
    "arch, tied, dtype",
    [
        ("llama", False, torch.bfloat16),
        ("llama", True, torch.float32),
        ("qwen2", False, torch.float32),
        ("mistral", False, torch.bfloat16),
        ("gpt2", True, torch.float32),
    ],
)
def test_merge_matches_reference(tmp_path, arch, tied, dtype):
    base, tasks = make_hf_family(tmp_path, arch, tied=tied, dtype=dtype)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05, tau=0.05)
    out = tmp_path / "out"
    result = merged(recipe, out)
    plan = result.plan
    # the cores the merge used are the brute-force cores
    bf = brute_force(load_folder(base), [load_folder(t) for t in tasks], 0.05)
    assert_plan_matches(plan, bf)
    check_against_reference(
        base, tasks, out, plan, omegas=[0.5] * 3, fusion_base=2, tasks_mask=[True] * 3
    )
    # a normal Hugging Face folder that transformers loads strictly
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for name in (
        "cpi_plan.json",
        "mergekit_config.yml",
        "cpi_manifest.json",
        "README.md",
        "jaccard.png",
    ):
        assert (out / name).exists(), name
    assert CorePlan.load(out) == plan


def test_fusion_base_flag_omega_and_non_task_model(tmp_path):
    base, models = make_hf_family(tmp_path, "llama", n_tasks=4)
    recipe = write_recipe(
        tmp_path / "r.yml",
        base,
        [
            (models[0], {"omega": 0.3}),
            (models[1], {"fusion_base": 1}),
            models[2],
            (models[3], {"task": 0, "omega": 0.8}),
        ],
        core_fraction=0.03,
        omega=0.6,
    )
    out = tmp_path / "out"
    plan = merged(recipe, out).plan
    assert [t.model for t in plan.tasks] == [str(m) for m in models[:3]]
    check_against_reference(
        base,
        models,
        out,
        plan,
        omegas=[0.3, 0.6, 0.6, 0.8],
        fusion_base=1,
        tasks_mask=[True, True, True, False],
    )
    card = (out / "README.md").read_text()
    assert f"`{models[1].name}`" in card and "# out\n" in card
    header = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in header and "cpi-merge" in header["tags"]  # not `[]`
    assert f"k = {plan.k:,}" in card and "exactly k" in card  # the counts, not "top 1%"
    resolved = (out / "mergekit_config.yml").read_text()
    assert "core_threshold" in resolved and "fusion_base: 1" in resolved


def _count_core_lookups(monkeypatch) -> list[bool]:
    """Record, per tensor the merge method fuses, whether it used the analysed cores."""
    from cpi_merge.analysis.known_cores import KnownCores

    used = []
    real = KnownCores.for_tensor

    def spy(self, *a, **k):
        found = real(self, *a, **k)
        used.append(found is not None)
        return found

    monkeypatch.setattr(KnownCores, "for_tensor", spy)
    return used


def _boundary_parameters(b):
    return {"core_threshold": b.threshold, "tie_base_abs": b.tie_base_abs, "tie_hash": b.tie_hash}


def test_given_thresholds_skip_the_analysis_and_give_the_same_model(tmp_path, monkeypatch):
    """Same model whether the cores come from the analysis or are found again per entry."""
    base, tasks = make_hf_family(tmp_path, "llama", dtype=torch.bfloat16)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    used = _count_core_lookups(monkeypatch)
    first = merged(recipe, tmp_path / "a").plan
    assert used and all(used)  # every tensor took the analysed cores...
    used.clear()
    import cpi_merge.commands as merge_module

    def no_analysis(*a, **k):
        raise AssertionError("analysis ran although every threshold was given")

    monkeypatch.setattr(merge_module, "run_analysis", no_analysis)
    given = write_recipe(
        tmp_path / "g.yml",
        base,
        [(t, _boundary_parameters(first.boundaries[t.name])) for t in tasks],
        core_fraction=0.05,
    )
    plan = merged(given, tmp_path / "b").plan
    assert used == []  # ...and here none were available: every entry compared again
    assert plan.source == "recipe" and plan.groups is None
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    merged(recipe, tmp_path / "c", strategy="histogram")  # keeps no positions
    c = load_folder(tmp_path / "c")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_register_refuses_a_different_cpi():
    from dataclasses import replace

    from mergekit.merge_methods import registry

    from cpi_merge.fusion.method import CpiMethod, register_cpi_method

    method = register_cpi_method()
    assert isinstance(method, CpiMethod)
    assert register_cpi_method() is method  # idempotent
    linear = registry._METHODS["linear"]
    impostor = type(linear)(replace(linear.spec, name="cpi"), linear.implementation)
    registry._METHODS["cpi"] = impostor
    try:
        with pytest.raises(CpiError, match="already has a different merge method"):
            register_cpi_method()
    finally:
        registry._METHODS["cpi"] = method


def test_python_run_merge_usage(tmp_path):
    """The documented Python route: register, then mergekit's own run_merge."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from cpi_merge.commands import analyze, resolved_recipe
    from cpi_merge.config.recipe import load_recipe
    from cpi_merge.fusion.method import register_cpi_method

    base, tasks = make_hf_family(tmp_path, "llama", n_tasks=2)
    path = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    recipe = load_recipe(path)
    plan = analyze(recipe, progress=False)
    register_cpi_method()
    config = MergeConfiguration.model_validate(resolved_recipe(recipe, plan, None))
    run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True, copy_tokenizer=False))
    a = load_folder(tmp_path / "out")
    ref_out = tmp_path / "ref"
    merged(path, ref_out)
    b = load_folder(ref_out)
    assert all(torch.equal(a[k].float(), b[k].float()) for k in b)
    assert (
        yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["merge_method"]
        == "cpi"
    )


def _save_word_tokenizer(folder, rename=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(96)}
    for old, new in (rename or {}).items():
        vocab[new] = vocab.pop(old)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)


def test_tokenizer_source_rearranges_embeddings_and_still_merges_the_same(tmp_path, monkeypatch):
    """A task that renamed two tokens: its rows for them count as unchanged (by token)."""
    import safetensors.torch

    base, tasks = make_hf_family(tmp_path, "llama", tied=False, dtype=torch.float32, step=0.02)
    _save_word_tokenizer(base)
    _save_word_tokenizer(tasks[0], rename={"t5": "tool", "t7": "x7"})
    for t in tasks[1:]:
        _save_word_tokenizer(t)
    for shard in tasks[0].glob("*.safetensors"):  # a big change on a row that moves
        tensors = safetensors.torch.load_file(shard)
        if "model.embed_tokens.weight" in tensors:
            tensors["model.embed_tokens.weight"][5] += 1.0
            safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    doc = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**doc, "tokenizer_source": "base"}))
    used = _count_core_lookups(monkeypatch)
    merged(recipe, tmp_path / "buffer", strategy="buffer")
    assert used and all(used)  # rows are compared by token: the positions are the merge's
    merged(recipe, tmp_path / "histogram", strategy="histogram")  # never hands cores over
    a, b = load_folder(tmp_path / "buffer"), load_folder(tmp_path / "histogram")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
