"""Recipe validation: every problem named at once, before any tensor is read."""

from __future__ import annotations

import math

import pytest
import yaml

from cpi_merge.config.recipe import DEFAULT_EPSILON, load_recipe, parse_recipe
from cpi_merge.errors import RecipeError


def recipe(**overrides):
    doc = {"merge_method": "cpi", "base_model": "b", "models": [{"model": "t1"}, {"model": "t2"}]}
    doc.update(overrides)
    return doc


def test_defaults_are_the_papers():
    r = parse_recipe(recipe())
    assert r.parameters.core_fraction == 0.01
    assert r.parameters.tau == 0.1
    assert r.parameters.omega == 0.5
    assert r.parameters.epsilon == DEFAULT_EPSILON == pytest.approx(math.acos(0.9995))
    assert r.fusion_base.model == "t2"
    assert [m.model for m in r.tasks] == ["t1", "t2"]


def test_all_problems_reported_together():
    doc = recipe(
        parameters={"core_fraction": 0, "tau": 1.5, "core_fracton": 0.1},
        dtpye="bfloat16",
    )
    with pytest.raises(RecipeError) as err:
        parse_recipe(doc, source="r.yml")
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "parameters.core_fraction" in text and "greater than 0" in text
    assert "parameters.tau" in text and "less than or equal to 1" in text
    assert "parameters.core_fracton: unknown key" in text and "core_fraction" in text
    assert "dtpye: unknown key" in text


@pytest.mark.parametrize(
    "doc, message",
    [
        (recipe(merge_method="ties"), "'ties' is not this tool's method"),
        (recipe(models=[]), "models"),
        (recipe(models=[{"model": "t1"}, {"model": "t1"}]), "listed more than once"),
        (recipe(models=[{"model": "b"}]), "also listed as a model"),
        (recipe(models=[{"model": "t1", "parameters": {"task": 0}}]), "no task model"),
        (recipe(models=[{"model": "t1", "parameters": {"omega": 2}}]), "models.0.parameters.omega"),
        (recipe(models=[{"model": "t1", "parameters": {"core_threshold": "x"}}]), "core_threshold"),
        (
            recipe(
                models=[
                    {"model": "t1", "parameters": {"fusion_base": 1}},
                    {"model": "t2", "parameters": {"fusion_base": 1}},
                ]
            ),
            "fusion_base: 1 is set on 2",
        ),
        (recipe(parameters={"core_fraction": [0.1, 0.2]}), "core_fraction"),
        (recipe(parameters={"tau": float("nan")}), "tau"),
        (recipe(dtype="int8"), "dtype"),
        (recipe(slices=[]), "slices: unknown key"),
        (recipe(parameters={"fusion_base": 2}), "fusion_base is set per model"),
        (recipe(parameters={"core_fraction": True}), "expected a number, got the boolean true"),
        (recipe(models=[{"model": "t1", "parameters": {"task": False}}]), "boolean false"),
    ],
)
def test_bad_recipes(doc, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(doc)


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="expected a YAML mapping"):
        parse_recipe(["a"])


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("a: [1,\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yml"
    evil.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(evil)


def test_fusion_base_flag_and_task_switch():
    r = parse_recipe(
        recipe(
            models=[
                {"model": "t1", "parameters": {"fusion_base": 1}},
                {"model": "sft", "parameters": {"task": 0}},
                {"model": "t2", "parameters": {"omega": 0.25, "core_threshold": 0.003}},
            ]
        )
    )
    assert r.fusion_base.model == "t1"
    assert [m.model for m in r.tasks] == ["t1", "t2"]
    assert r.models[2].parameters.core_threshold == 0.003


def test_recipe_is_valid_mergekit_yaml():
    from mergekit.config import MergeConfiguration

    doc = recipe(
        parameters={"core_fraction": 0.02, "tau": 0.2},
        models=[{"model": "t1", "parameters": {"omega": 0.3, "task": 1}}, {"model": "t2"}],
    )
    parse_recipe(doc)
    MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(doc)))
