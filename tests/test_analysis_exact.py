"""End to end on tiny checkpoints: the analysis equals the in-memory brute force bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.synthetic import LlamaShape, TaskSpec, make_family
from cpi_merge.commands import analyze

from helpers.files import load_folder, write_model, write_recipe
from helpers.references import assert_plan_matches, brute_force

STRATEGIES = ["buffer", "histogram"]


def run(recipe, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("plots", False)
    return analyze(recipe, **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sharded_family_matches_brute_force(tmp_path, strategy, dtype):
    shape = LlamaShape(vocab=48, hidden=16, intermediate=40, layers=2)
    specs = [TaskSpec(hot_layers=[0], shared=0.7, seed=s) for s in (1, 2)]
    specs.append(TaskSpec(hot_layers=[1], seed=3))
    base, tasks = make_family(tmp_path, shape, specs, dtype=dtype, shard_bytes=3000)
    assert len(list(base.glob("*.safetensors"))) > 2
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.02)
    exact = strategy == "buffer"  # the curve comes from the first pass: either strategy
    plan = run(recipe, strategy=strategy, chunk_entries=100, energy_curve=exact)
    ref = brute_force(load_folder(base), [load_folder(t) for t in tasks], 0.02)
    assert_plan_matches(plan, ref)
    assert plan.total_parameters == shape.num_parameters
    for task in plan.tasks:
        assert len(task.energy_curve) >= 4 and set(task.p_holding) == {"0.5", "0.9"}


def _tensors(rng, dtype, names_shapes, scale=1.0):
    return {
        n: (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) * scale).to(dtype)
        for n, s in names_shapes
    }


SHAPES = [("a.weight", (7, 5)), ("b.bias", (13,)), ("c.weight", (4, 4, 3)), ("d.weight", (1,))]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_dtypes_compute_in_float32(tmp_path, strategy):
    rng = np.random.default_rng(0)
    base = _tensors(rng, torch.float32, SHAPES)
    t1 = {n: (v + 0.01 * torch.randn(v.shape)).to(torch.bfloat16) for n, v in base.items()}
    t2 = {n: (v + 0.01 * torch.randn(v.shape)).to(torch.float16) for n, v in base.items()}
    paths = [write_model(tmp_path / n, t) for n, t in [("base", base), ("t1", t1), ("t2", t2)]]
    recipe = write_recipe(tmp_path / "r.yml", paths[0], paths[1:], core_fraction=0.1)
    assert_plan_matches(run(recipe, strategy=strategy), brute_force(base, [t1, t2], 0.1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recipe_dtype_is_applied_before_the_difference(tmp_path, strategy):
    # mergekit casts inputs to the recipe's dtype before a merge method sees them; the
    # analysis must see the same values or the merge would recompute other cores.
    rng = np.random.default_rng(1)
    base = _tensors(rng, torch.float32, SHAPES)
    task = {n: v + 1e-3 * torch.randn(v.shape) for n, v in base.items()}
    paths = [write_model(tmp_path / "base", base), write_model(tmp_path / "t", task)]
    recipe = write_recipe(tmp_path / "r.yml", paths[0], paths[1:], core_fraction=0.2)
    text = recipe.read_text() + "dtype: bfloat16\n"
    recipe.write_text(text)
    ref = brute_force(base, [task], 0.2, cast=torch.bfloat16)
    assert_plan_matches(run(recipe, strategy=strategy), ref)


@pytest.mark.parametrize("exact_k", [1, 0])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ties_at_the_threshold(tmp_path, strategy, exact_k):
    """bf16-like steps: Δ takes 3 values and |θ0| 3, so the tie rule decides most of a core."""
    rng = np.random.default_rng(2)
    base = {
        n: torch.from_numpy(rng.choice([0.25, -0.5, 1.0], s).astype(np.float32)) for n, s in SHAPES
    }
    tasks = [
        {
            n: v + torch.from_numpy(rng.integers(0, 3, v.shape).astype(np.float32) * 0.125)
            for n, v in base.items()
        }
        for _ in range(3)
    ]
    paths = [write_model(tmp_path / f"m{i}", t) for i, t in enumerate([base, *tasks])]
    recipe = write_recipe(
        tmp_path / "r.yml", paths[0], paths[1:], core_fraction=0.05, exact_k=exact_k, tie_seed=7
    )
    plan = run(recipe, strategy=strategy, chunk_entries=7, energy_curve=True)
    ref = brute_force(base, tasks, 0.05, exact_k=bool(exact_k), seed=7)
    assert_plan_matches(plan, ref)
    for t in plan.tasks:  # the ties are really there and decide part of every core
        assert t.at_threshold > t.taken_at_threshold > 0 if exact_k else t.core_count > plan.k
    assert all(t.core_count == plan.k for t in plan.tasks) == bool(exact_k)


def test_result_does_not_depend_on_shard_layout(tmp_path):
    rng = np.random.default_rng(3)
    base = _tensors(rng, torch.bfloat16, SHAPES)
    task = {
        n: (v.float() + 0.05 * torch.randn(v.shape)).to(torch.bfloat16) for n, v in base.items()
    }
    plans = []
    for layout, (order, shard) in enumerate([(1, None), (-1, 200), (1, 90)]):

        def reorder(d, order=order):
            return dict(list(d.items())[::order])

        b = write_model(tmp_path / f"b{layout}", reorder(base), shard_bytes=shard)
        t = write_model(
            tmp_path / f"t{layout}", reorder(task), shard_bytes=shard if layout != 2 else 130
        )
        recipe = write_recipe(tmp_path / f"r{layout}.yml", b, [t], core_fraction=0.1)
        plans.append(run(recipe))
    for p in plans[1:]:
        assert p.tasks[0].core_threshold_bits == plans[0].tasks[0].core_threshold_bits
        assert p.tasks[0].per_tensor == plans[0].tasks[0].per_tensor
        assert p.intersections == plans[0].intersections


def test_tied_embeddings_and_integer_buffers(tmp_path):
    shape = LlamaShape(vocab=32, hidden=8, intermediate=16, layers=1, tie_embeddings=True)
    base, tasks = make_family(
        tmp_path, shape, [TaskSpec(seed=1), TaskSpec(seed=2)], dtype=torch.float32
    )
    # an integer buffer is stored but not part of D
    for folder in [base, *tasks]:
        tensors = load_folder(folder)
        tensors["model.position_ids"] = torch.arange(16)
        (folder / "model.safetensors").unlink()
        write_model(folder, tensors)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.03)
    plan = run(recipe)
    assert plan.total_parameters == shape.num_parameters
    assert "lm_head.weight" not in {t.name for t in plan.tensors}
    bf = {n: v for n, v in load_folder(base).items()}
    assert_plan_matches(plan, brute_force(bf, [load_folder(t) for t in tasks], 0.03))


def test_non_task_models_have_no_core(tmp_path, tiny_family):
    base, tasks = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", base, [tasks[0], tasks[1], (tasks[2], {"task": 0})])
    plan = run(recipe)
    assert [t.model for t in plan.tasks] == [str(tasks[0]), str(tasks[1])]  # absolute
    assert plan.task_names == ["task_0", "task_1"]
    ref = brute_force(load_folder(base), [load_folder(t) for t in tasks[:2]], 0.01)
    assert_plan_matches(plan, ref)


def test_strategies_and_chunkings_agree_on_the_family(tiny_family, tmp_path):
    base, tasks = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.03, tau=0.05)
    plans = [run(recipe, strategy=s, chunk_entries=c) for s in STRATEGIES for c in (64, 1 << 22)]
    # everything but the float sums (summed in chunk order) is identical, those are close
    sums = {"relative_update_norm", "core_energy_share", "energy_curve"}
    dumps = {
        p.model_dump_json(
            exclude={
                "strategy": True,
                "task_cosine": True,
                "verdict": True,
                "tasks": {"__all__": sums},
            }
        )
        for p in plans
    }
    assert len(dumps) == 1
    for p in plans[1:]:
        assert np.allclose(p.task_cosine, plans[0].task_cosine, rtol=1e-5)
        for a, b in zip(p.tasks, plans[0].tasks):
            assert a.core_energy_share == pytest.approx(b.core_energy_share, rel=1e-5)
    assert plans[0].jaccard[0][1] > 0.05 and plans[0].jaccard[0][2] < 0.05
    assert sorted(plans[0].groups) == [["task_0", "task_1"], ["task_2"]]


@pytest.mark.parametrize("cuts", ["partial_sample", "too_high"])
def test_starting_cuts_never_change_the_result(tmp_path, monkeypatch, cuts):
    """The sampled starting cut is a guess: from a partial sample, or too high (redone)."""
    import cpi_merge.analysis.run as analysis
    from cpi_merge.analysis.delta_stream import DeltaStream

    shape = LlamaShape(vocab=48, hidden=16, intermediate=40, layers=2)
    specs = [TaskSpec(hot_layers=[0], shared=0.7, seed=s) for s in (1, 2)]
    base, tasks = make_family(tmp_path, shape, specs, shard_bytes=3000)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.2)
    passes, used = [], []
    real_call = DeltaStream.__call__
    monkeypatch.setattr(
        DeltaStream, "__call__", lambda self, *a: passes.append(a) or real_call(self, *a)
    )
    if cuts == "too_high":
        monkeypatch.setattr(analysis, "estimate_cuts", lambda s, **kw: [1e30] * len(s))
    else:
        real_sample = DeltaStream.sample
        monkeypatch.setattr(
            DeltaStream, "sample", lambda self: real_sample(self, self.total // 10, block=8)
        )
        real_estimate = analysis.estimate_cuts
        monkeypatch.setattr(
            analysis, "estimate_cuts", lambda *a, **k: used.extend(real_estimate(*a, **k)) or used
        )
    plan = run(recipe, strategy="buffer", chunk_entries=100)
    ref = brute_force(load_folder(base), [load_folder(t) for t in tasks], 0.2)
    assert_plan_matches(plan, ref)
    assert len(passes) == (2 if cuts == "too_high" else 1)
    if cuts == "partial_sample":
        assert len(used) == 2 and all(0 < c < t for c, t in zip(used, plan.thresholds.values()))
        # the energy curves are then estimates from the sample, and say so
        assert 0 < plan.energy_curve_sample < plan.total_parameters
        for task, ranked in zip(plan.tasks, ref["sorted_energy"]):
            for share_of_entries, share_of_energy in task.energy_curve:
                exact = ranked[round(share_of_entries * plan.total_parameters) - 1]
                assert abs(share_of_energy - exact) < 0.15
