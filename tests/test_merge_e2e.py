"""cpi-merge end to end through mergekit, on tiny models of several architectures."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner

from cpi_merge.cli.merge import main as merge_cli
from cpi_merge.errors import CpiError, OutputError, RecipeError
from cpi_merge.merge import merge
from cpi_merge.plan import CorePlan
from cpi_merge.recipe import DEFAULT_EPSILON

from conftest import brute_force, load_folder, write_recipe
from hf_models import make_hf_family
from test_fusion import ref_fuse


def merged(recipe, out, **kw):
    from mergekit.options import MergeOptions

    kw.setdefault("options", MergeOptions(quiet=True))
    return merge(recipe, out, **kw)


def check_against_reference(base, models, out, plan, *, omegas, fusion_base, tasks_mask):
    inputs = [load_folder(base)] + [load_folder(m) for m in models]
    result = load_folder(out)
    thresholds = iter(plan.thresholds[str(m)] for m, is_task in zip(models, tasks_mask) if is_task)
    per_model_t = [next(thresholds) if is_task else None for is_task in tasks_mask]
    assert set(result) == set(inputs[0])
    for name, got in result.items():
        owner, ref = ref_fuse(
            inputs[0][name],
            [m[name] for m in inputs[1:]],
            per_model_t,
            omegas,
            fusion_base,
            DEFAULT_EPSILON,
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
    assert [t.core_threshold for t in plan.tasks] == pytest.approx(bf[0], rel=0, abs=0)
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
    assert f"`{models[1]}`" in card and "# out\n" in card
    resolved = (out / "mergekit_config.yml").read_text()
    assert "core_threshold" in resolved and "fusion_base: 1" in resolved


def _count_core_lookups(monkeypatch) -> list[bool]:
    """Record, per tensor the merge method fuses, whether it used the analysed cores."""
    from cpi_merge.known_cores import KnownCores

    used = []
    real = KnownCores.for_tensor

    def spy(self, *a, **k):
        found = real(self, *a, **k)
        used.append(found is not None)
        return found

    monkeypatch.setattr(KnownCores, "for_tensor", spy)
    return used


def test_given_thresholds_skip_the_analysis_and_give_the_same_model(tmp_path, monkeypatch):
    """Same model whether the cores come from the analysis or are found again per entry."""
    base, tasks = make_hf_family(tmp_path, "llama", dtype=torch.bfloat16)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    used = _count_core_lookups(monkeypatch)
    first = merged(recipe, tmp_path / "a").plan
    assert used and all(used)  # every tensor took the analysed cores...
    used.clear()
    import cpi_merge.merge as merge_module

    def no_analysis(*a, **k):
        raise AssertionError("analysis ran although every threshold was given")

    monkeypatch.setattr(merge_module, "run_analysis_keeping_cores", no_analysis)
    given = write_recipe(
        tmp_path / "g.yml",
        base,
        [(t, {"core_threshold": first.thresholds[str(t)]}) for t in tasks],
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


def test_some_thresholds_given_is_an_error(tmp_path):
    base, tasks = make_hf_family(tmp_path, "llama", n_tasks=2)
    recipe = write_recipe(
        tmp_path / "r.yml", base, [(tasks[0], {"core_threshold": 0.01}), tasks[1]]
    )
    with pytest.raises(RecipeError, match="set it on every task"):
        merged(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_is_refused_before_work(tmp_path):
    base, tasks = make_hf_family(tmp_path, "llama", n_tasks=2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tasks[1])
    model.resize_token_embeddings(100)
    import shutil

    shutil.rmtree(tasks[1])
    model.save_pretrained(tasks[1])
    recipe = write_recipe(tmp_path / "r.yml", base, tasks)
    with pytest.raises(
        CpiError,
        match="vocabulary size differs in 'model.embed_tokens.weight': 100 rows, base has 96",
    ):
        merged(recipe, tmp_path / "out")


def test_output_safety(tmp_path, monkeypatch):
    base, tasks = make_hf_family(tmp_path, "llama", n_tasks=2)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="--force"):
        merged(recipe, out)
    with pytest.raises(OutputError, match="overlaps the input"):
        merged(recipe, tasks[0] / "merged")
    # an interrupted merge leaves the old output as it was and no partial folder
    import cpi_merge.fusion as fusion

    calls = {"n": 0}
    real = fusion.fuse_tensor

    def dies_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("cpi_merge.merge_method.fuse_tensor", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        merged(recipe, out, force=True)
    assert os.listdir(out) == ["mine.txt"]
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    monkeypatch.setattr("cpi_merge.merge_method.fuse_tensor", real)
    merged(recipe, out, force=True)
    assert "mine.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_manifest_hashes(tmp_path):
    base, tasks = make_hf_family(tmp_path, "llama", n_tasks=2)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    merged(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "cpi_manifest.json").read_text())
    import hashlib

    assert [i["role"] for i in manifest["inputs"]] == ["base_model", "models[0]", "models[1]"]
    for name, rec in manifest["outputs"].items():
        data = (tmp_path / "out" / name).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
    shard = next(iter(k for k in manifest["inputs"][0]["files"] if k.endswith(".safetensors")))
    assert (
        manifest["inputs"][0]["files"][shard]["sha256"]
        == hashlib.sha256((base / shard).read_bytes()).hexdigest()
    )


def test_cli_passes_mergekit_options(tmp_path):
    base, tasks = make_hf_family(tmp_path, "llama", n_tasks=2)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        merge_cli,
        [
            str(recipe),
            str(out),
            "--out-shard-size",
            "10K",
            "--no-write-model-card",
            "--quiet",
            "--order",
            "given",
        ],
    )
    assert result.exit_code == 0, result.output
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and "README.md" not in files
    assert json.loads((out / "cpi_plan.json").read_text())["order"] == "given"
    bad = CliRunner().invoke(merge_cli, [str(recipe), str(out), "--quiet"])
    assert bad.exit_code == 2 and "--force" in bad.output


def test_register_refuses_a_different_cpi():
    from dataclasses import replace

    from mergekit.merge_methods import registry

    from cpi_merge.merge_method import cpi_fusion, register_cpi_method

    assert register_cpi_method() is cpi_fusion
    assert register_cpi_method() is cpi_fusion  # idempotent
    linear = registry._METHODS["linear"]
    impostor = type(linear)(replace(linear.spec, name="cpi"), linear.implementation)
    registry._METHODS["cpi"] = impostor
    try:
        with pytest.raises(CpiError, match="already has a different merge method"):
            register_cpi_method()
    finally:
        registry._METHODS["cpi"] = cpi_fusion


def test_python_run_merge_usage(tmp_path):
    """The documented Python route: register, then mergekit's own run_merge."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from cpi_merge.analysis import analyze
    from cpi_merge.merge import resolved_recipe
    from cpi_merge.merge_method import register_cpi_method
    from cpi_merge.recipe import load_recipe

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


def _poison(folder, name, value):
    """Rewrite one tensor of a saved model with a NaN/Inf at entry 0."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = value
    shutil.rmtree(folder)
    model.save_pretrained(folder)


@pytest.mark.parametrize("who", ["base", "task", "fusion_base_not_task"])
def test_nan_or_inf_with_given_thresholds_is_refused(tmp_path, who):
    """No analysis pass to catch it: the merge itself must refuse, naming the tensor."""
    base, models = make_hf_family(tmp_path, "llama", n_tasks=3)
    target = {"base": base, "task": models[0], "fusion_base_not_task": models[2]}[who]
    _poison(
        target, "model.layers.1.mlp.up_proj.weight", float("nan") if who != "task" else float("inf")
    )
    recipe = write_recipe(
        tmp_path / "r.yml",
        base,
        [
            (models[0], {"core_threshold": 0.05}),
            (models[1], {"core_threshold": 0.05}),
            (models[2], {"task": 0}),
        ],
    )
    with pytest.raises(CpiError, match="model.layers.1.mlp.up_proj.weight.*NaN/Inf"):
        merged(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_relative_local_paths_never_query_the_hub(tmp_path, monkeypatch):
    """`dir/name` looks like a Hub id: mergekit's card would ask the Hub (offline: crash)."""
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(huggingface_hub, "repo_exists", offline)
    make_hf_family(tmp_path / "fam", "llama", n_tasks=2)
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yml", "fam/base", ["fam/task_0", "fam/task_1"], core_fraction=0.05
    )
    result = merged(recipe, tmp_path / "out")
    assert [t.model for t in result.plan.tasks] == ["fam/task_0", "fam/task_1"]  # as written
    assert str(tmp_path / "fam" / "base") in (tmp_path / "out" / "mergekit_config.yml").read_text()


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
    """mergekit moves embedding rows for tokenizer_source: not the values analysed."""
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
    assert used == []  # the analysed positions are not handed over
    merged(recipe, tmp_path / "histogram", strategy="histogram")  # never hands cores over
    a, b = load_folder(tmp_path / "buffer"), load_folder(tmp_path / "histogram")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
