"""Bad input to the analysis: clear errors, naming model and tensor, before long work."""

from __future__ import annotations

import pytest
import torch

from cpi_merge.commands import analyze
from cpi_merge.errors import CheckpointError, DegenerateTaskError, NonFiniteError, RecipeError
from cpi_merge.io.checkpoints import Checkpoint

from helpers.files import write_model, write_recipe

BASE = {"x.weight": torch.zeros(6, 4), "y.weight": torch.zeros(10)}


def perturbed(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: v + scale * torch.randn(v.shape, generator=g) for n, v in BASE.items()}


def setup(tmp_path, *tasks, **params):
    base = write_model(tmp_path / "base", BASE)
    paths = [write_model(tmp_path / f"t{i}", t) for i, t in enumerate(tasks)]
    return write_recipe(tmp_path / "r.yml", base, paths, **params), paths


def run(recipe, **kw):
    return analyze(recipe, progress=False, plots=False, **kw)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor data is read."""

    def boom(self, name):
        raise AssertionError(f"tensor data read ({name}) before the input was validated")

    monkeypatch.setattr(Checkpoint, "get", boom)


def test_shape_mismatch_before_any_read(tmp_path, no_tensor_reads):
    bad = perturbed()
    bad["x.weight"] = torch.zeros(4, 6)
    recipe, paths = setup(tmp_path, perturbed(1), bad)
    with pytest.raises(
        CheckpointError, match=r"models\[1\].*'x.weight' has shape \[4, 6\], base has \[6, 4\]"
    ):
        run(recipe)


def test_missing_tensor_before_any_read(tmp_path, no_tensor_reads):
    bad = perturbed()
    bad.pop("y.weight")
    recipe, _ = setup(tmp_path, bad)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) of the base: \['y.weight'\]"):
        run(recipe)


def test_every_missing_model_is_listed(tmp_path, no_tensor_reads):
    base = write_model(tmp_path / "base", BASE)
    recipe = write_recipe(tmp_path / "r.yml", base, [tmp_path / "gone1", tmp_path / "gone2"])
    with pytest.raises(CheckpointError) as err:
        run(recipe)
    assert "models[0]" in str(err.value) and "models[1]" in str(err.value)
    assert str(err.value).count("no such folder") == 2


def test_core_fraction_that_selects_nothing(tmp_path, no_tensor_reads):
    recipe, _ = setup(tmp_path, perturbed(), core_fraction=0.01)  # D = 34 -> k = 0
    with pytest.raises(RecipeError, match="selects floor.*= 0 of the D = 34 entries"):
        run(recipe)


@pytest.mark.parametrize("strategy", ["buffer", "histogram"])
def test_nan_and_inf_are_counted_and_named(tmp_path, strategy):
    bad = perturbed()
    bad["y.weight"][[1, 3]] = float("nan")
    bad["y.weight"][5] = float("inf")
    recipe, _ = setup(tmp_path, perturbed(1), bad, core_fraction=0.5)
    with pytest.raises(NonFiniteError) as err:
        run(recipe, strategy=strategy)
    text = str(err.value)
    assert "'y.weight'" in text and "t1" in text and "2 NaN and 1 Inf" in text
    assert "t0" not in text  # the clean model is not blamed


def test_nan_in_base_is_attributed_to_the_base(tmp_path):
    recipe, _ = setup(tmp_path, perturbed(1), core_fraction=0.5)
    nan_base = dict(BASE)
    nan_base["x.weight"] = BASE["x.weight"].clone()
    nan_base["x.weight"][0, 0] = float("nan")
    write_model(tmp_path / "base", nan_base)
    with pytest.raises(NonFiniteError, match="base_model .* has 1 NaN and 0 Inf"):
        run(recipe)


def test_task_identical_to_base(tmp_path):
    recipe, _ = setup(tmp_path, perturbed(1), dict(BASE), core_fraction=0.5)
    with pytest.raises(DegenerateTaskError, match=r"t1.*only 0 of 34 entries differ"):
        run(recipe)


def test_task_changing_too_few_entries(tmp_path):
    sparse = {n: v.clone() for n, v in BASE.items()}
    sparse["x.weight"][0, :3] = 1.0
    recipe, _ = setup(tmp_path, sparse, core_fraction=0.5)
    with pytest.raises(DegenerateTaskError, match="only 3 of 34 entries differ.*below 0.0882"):
        run(recipe)


def test_bad_order_and_strategy(tmp_path):
    recipe, _ = setup(tmp_path, perturbed(), core_fraction=0.5)
    with pytest.raises(RecipeError, match="order"):
        run(recipe, order="sorted")
    with pytest.raises(RecipeError, match="strategy"):
        run(recipe, strategy="fast")
