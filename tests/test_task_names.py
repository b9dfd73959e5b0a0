"""One task identity: a short unique name per model, used everywhere a task is named."""

from __future__ import annotations

import os

import pytest
import yaml

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.commands import analyze
from cpi_merge.config.recipe import parse_recipe
from cpi_merge.config.task_names import derive_names
from cpi_merge.errors import RecipeError


@pytest.mark.parametrize(
    "refs, names",
    [
        (["runs/math/", "runs/code"], ["math", "code"]),
        (["org/llama-math@v2", "/abs/path/chat"], ["llama-math", "chat"]),
        (["a/final", "b/final", "c/other"], ["a_final", "b_final", "other"]),
        (["x/a/final", "y/a/final"], ["x_a_final", "y_a_final"]),
        (["./my model!", "ok"], ["my_model_", "ok"]),
    ],
)
def test_derived_names_are_short_and_unique(refs, names):
    assert derive_names(refs) == names


def _recipe(models):
    return {"merge_method": "cpi", "base_model": "b", "models": models}


def test_a_given_name_wins_and_mergekit_accepts_the_key():
    from mergekit.config import MergeConfiguration

    doc = _recipe([{"model": "runs/a/final", "name": "math"}, {"model": "runs/b/final"}])
    assert parse_recipe(doc).names == ["math", "final"]
    clash = _recipe([{"model": "a", "name": "final"}, {"model": "runs/b/final"}])
    assert parse_recipe(clash).names == ["final", "b_final"]  # the derived one grows
    MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(doc)))


@pytest.mark.parametrize(
    "models, message",
    [
        ([{"model": "a", "name": "x"}, {"model": "b", "name": "x"}], "2 models are named 'x'"),
        ([{"model": "a", "name": "x"}, {"model": "x"}], "2 models are named 'x'"),
        ([{"model": "a", "name": "no/slash"}], "must be letters, digits"),
    ],
)
def test_bad_names_are_refused(models, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_recipe(models))


def test_a_plan_names_tasks_and_finds_its_models_from_anywhere(tiny_family, tmp_path, monkeypatch):
    base, tasks = tiny_family
    monkeypatch.chdir(base.parent)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            _recipe([{"model": "task_0", "name": "math"}, {"model": "task_1"}, {"model": "task_2"}])
            | {"base_model": "base"}
        )
    )
    analyze(recipe, tmp_path / "plan", progress=False, plots=False)
    monkeypatch.chdir(tmp_path)  # somewhere else: relative references would not resolve
    plan = CorePlan.load(tmp_path / "plan")
    assert plan.task_names == ["math", "task_1", "task_2"]
    assert sorted(sum(plan.groups, [])) == sorted(plan.task_names)
    assert all(os.path.isdir(t.model) for t in plan.tasks) and os.path.isdir(plan.base_model)
    assert plan.task("math").model == str(tasks[0])
    with pytest.raises(Exception, match="not in the plan"):
        plan.task("nope")
