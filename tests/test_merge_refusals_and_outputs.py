"""cpi-merge's refusals and outputs: bad inputs, output safety, the manifest, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from cpi_merge.cli.merge import main as merge_cli
from cpi_merge.errors import CpiError, OutputError, RecipeError

from helpers.files import merged, write_recipe
from helpers.hf_models import make_hf_family


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
    import cpi_merge.fusion.kernel as fusion

    calls = {"n": 0}
    real = fusion.fuse_tensor

    def dies_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("cpi_merge.fusion.method.fuse_tensor", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        merged(recipe, out, force=True)
    assert os.listdir(out) == ["mine.txt"]
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    monkeypatch.setattr("cpi_merge.fusion.method.fuse_tensor", real)
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
    assert result.plan.task_names == ["task_0", "task_1"]
    assert [os.path.realpath(t.model) for t in result.plan.tasks] == [
        os.path.realpath(tmp_path / "fam" / f"task_{i}") for i in range(2)
    ]  # resolved, so the plan works from any directory
    assert str(tmp_path / "fam" / "base") in (tmp_path / "out" / "mergekit_config.yml").read_text()


def test_ctrl_c_while_importing_prints_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if "merge_command" in name or (args[2:] and "merge_command" in (args[2] or ())):
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    import sys

    monkeypatch.delitem(sys.modules, "cpi_merge.cli.merge_command", raising=False)
    result = CliRunner().invoke(merge_cli, [str(tmp_path / "r.yml"), str(tmp_path / "out")])
    assert result.exit_code == 130
    assert result.output.count("\n") == 1 and "interrupted" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
