"""Plan file, pictures, output-folder safety, and the cpi-analyze command."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.cli.analyze import main
from cpi_merge.commands import analyze
from cpi_merge.errors import CpiError, OutputError
from cpi_merge.report.summary import format_summary

from helpers.files import write_recipe


@pytest.fixture
def recipe(tiny_family, tmp_path):
    base, tasks = tiny_family
    return write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.02, tau=0.05)


def test_plan_file_and_pictures(recipe, tmp_path):
    out = tmp_path / "out"
    plan = analyze(recipe, out, progress=False)
    pictures = ["core_map.png", "diagnostics.png", "jaccard.png"]
    assert sorted(os.listdir(out)) == sorted(["cpi_plan.json", *pictures])
    for png in pictures:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "cpi_plan.json").read_text())
    assert data["schema_version"] == 2
    for key in ("total_parameters", "core_fraction", "tau", "seed", "tasks", "jaccard", "groups"):
        assert key in data
    for key in ("task_cosine", "sign_conflict_rate", "verdict"):  # the diagnostics
        assert data[key] is not None
    assert all(0 < t["core_energy_share"] <= 1 for t in data["tasks"])
    assert data["energy_curve_sample"] is None  # a tiny model: the sample is every entry
    assert all(len(t["energy_curve"]) >= 4 for t in data["tasks"])
    assert [t["model"] for t in data["tasks"]] == [
        os.path.abspath(m["model"])
        for m in __import__("yaml").safe_load(recipe.read_text())["models"]
    ]
    assert CorePlan.load(out) == plan
    assert sorted(sum(plan.groups, [])) == sorted(plan.task_names)


def test_plan_rejects_unknown_schema_and_bad_bits(recipe, tmp_path):
    plan = analyze(recipe, tmp_path / "o", progress=False, plots=False)
    data = json.loads(plan.model_dump_json())
    data["schema_version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(CpiError, match="schema_version 99 is not supported"):
        CorePlan.load(tmp_path / "v.json")
    data["schema_version"] = 2
    data["tasks"][0]["core_threshold_bits"] = "0x00000001"
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(CpiError, match="does not match its bit pattern"):
        CorePlan.load(tmp_path / "b.json")


def test_existing_output_needs_force(recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(OutputError, match="--force"):
        analyze(recipe, out, progress=False)
    assert (out / "keep.txt").read_text() == "user file"
    analyze(recipe, out, progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "cpi_plan.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []


def test_output_inside_an_input_is_refused(recipe, tiny_family):
    base, _ = tiny_family
    with pytest.raises(OutputError, match="overlaps the input folder"):
        analyze(recipe, base / "analysis", progress=False)


def test_failure_leaves_no_output(recipe, tmp_path, monkeypatch):
    import cpi_merge.report.plots as plots

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "write_plots", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        analyze(recipe, out, progress=False)
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if "partial" in p] == []


def test_cli_summary_and_files(recipe, tmp_path):
    out = tmp_path / "cli_out"
    result = CliRunner().invoke(
        main,
        [str(recipe), "--out", str(out), "--order", "given", "--seed", "3", "--energy-curve"],
    )
    assert result.exit_code == 0, result.output
    assert "threshold t_i" in result.output and "Jaccard similarity" in result.output
    assert "stage 1: task_0, task_1" in result.output
    assert "energy in core" in result.output and "Merge-ability" in result.output
    data = json.loads((out / "cpi_plan.json").read_text())
    assert data["order"] == "given" and data["seed"] == 3
    assert all(len(t["energy_curve"]) >= 4 for t in data["tasks"])


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: cpi\nbase_model: x\nmodels: []\nparameters: {tau: 2}\n")
    result = CliRunner().invoke(main, [str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "parameters.tau" in result.output
    assert "Traceback" not in result.output


def test_cli_memory_budget_forces_histogram(recipe, tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, [str(recipe), "--out", str(out), "--memory-budget", "1K", "-q"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "cpi_plan.json").read_text())
    assert plan["strategy"] == "histogram"
    # says why, with the arithmetic: k entries per task x 48 B against the 1 KiB budget
    need = len(plan["tasks"]) * plan["k"] * 48 / 1e9
    reason = (
        f"auto: the one-pass buffer needs up to {need:.2f} GB, which does not fit the "
        "memory budget of 0.00 GB"
    )
    assert plan["strategy_reason"] == reason
    assert f"strategy histogram: {reason}" in format_summary(CorePlan.load(out))


def test_auto_strategy_says_the_buffer_fits(recipe, tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(main, [str(recipe), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "cpi_plan.json").read_text())
    assert plan["strategy"] == "buffer"
    assert "which fits the memory budget" in plan["strategy_reason"]
    forced = tmp_path / "f"
    CliRunner().invoke(main, [str(recipe), "--out", str(forced), "-q", "--strategy", "histogram"])
    assert json.loads((forced / "cpi_plan.json").read_text())["strategy_reason"] == "asked for"
