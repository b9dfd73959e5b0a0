"""Every recipe under merge_configs/ validates (ours and mergekit's) and is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergekit.config import MergeConfiguration

from cpi_merge.config.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "merge_configs").glob("*.yml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_and_opens_with_a_comment(path):
    recipe = load_recipe(path)
    MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    head = path.read_text().splitlines()
    assert head[0].startswith("# "), "opens with a comment saying what it does"
    comments = "\n".join(line for line in head if line.startswith("#"))
    assert "cpi-merge " in comments or "cpi-analyze " in comments, "gives the exact command"
    assert "Override example" in comments
    assert recipe.tasks
