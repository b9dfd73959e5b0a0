"""Shared helpers: tiny checkpoints written to tmp folders, and the brute-force reference."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cpi_merge.synthetic import LlamaShape, TaskSpec, make_family, write_checkpoint


def write_model(folder, tensors, *, shard_bytes=None, config=True):
    """Write a tiny model folder from a {name: tensor} dict (Llama-ish config if asked)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"} if config else None
    return write_checkpoint(folder, tensors, cfg, max_shard_bytes=shard_bytes)


def write_recipe(path, base, models, **parameters):
    """Write a cpi recipe; ``models`` is a list of paths or (path, {param: value})."""
    entries = []
    for m in models:
        if isinstance(m, tuple):
            entries.append({"model": str(m[0]), "parameters": m[1]})
        else:
            entries.append({"model": str(m)})
    doc = {"merge_method": "cpi", "base_model": str(base), "models": entries}
    if parameters:
        doc["parameters"] = parameters
    Path(path).write_text(yaml.safe_dump(doc))
    return Path(path)


def brute_force(base, tasks, p, cast=None):
    """Reference cores: concatenate every |θi − θ0| in memory and take torch.topk.

    Args:
        base: {name: tensor} of θ0 (floating tensors only are used).
        tasks: list of {name: tensor}.
        p: core fraction.
        cast: optional dtype applied to inputs first (the recipe's dtype).

    Returns:
        (thresholds list[float], counts {name: [per task]}, intersections ndarray, k)
    """
    names = sorted(n for n, t in base.items() if t.is_floating_point())

    def prep(t):
        return (t.to(cast) if cast is not None else t).float().reshape(-1)

    total = sum(base[n].numel() for n in names)
    k = int(Decimal(repr(p)) * total)
    masks, thresholds = [], []
    for task in tasks:
        delta = torch.cat([(prep(task[n]) - prep(base[n])).abs() for n in names])
        t = float(torch.topk(delta, k).values[-1])
        thresholds.append(t)
        masks.append(delta >= t)
    sizes = [base[n].numel() for n in names]
    counts = {}
    for i, m in enumerate(masks):
        for n, part in zip(names, torch.split(m, sizes)):
            counts.setdefault(n, [0] * len(tasks))[i] = int(part.sum())
    inter = np.array([[int((a & b).sum()) for b in masks] for a in masks])
    return thresholds, counts, inter, k


def load_folder(folder):
    """Read every tensor of a model folder directly with safetensors (no mergekit)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_plan_matches(plan, reference):
    thresholds, counts, inter, k = reference
    assert plan.k == k
    for i, task in enumerate(plan.tasks):
        # bit for bit: compare the float32 bit patterns
        ref = np.float32(thresholds[i]).view(np.uint32)
        got = np.float32(task.core_threshold).view(np.uint32)
        assert got == ref, (task.model, task.core_threshold, thresholds[i])
        assert task.core_count == inter[i, i]
        for name, per_task in counts.items():
            assert task.per_tensor[name] == per_task[i], (task.model, name)
    assert np.array_equal(np.array(plan.intersections), inter)


@pytest.fixture
def tiny_family(tmp_path):
    """A 3-task synthetic Llama family in bf16, sharded; tasks 0 and 1 overlap."""
    shape = LlamaShape(vocab=64, hidden=32, intermediate=64, layers=3)
    specs = [
        TaskSpec(hot_layers=[0, 1], shared=0.8, seed=1),
        TaskSpec(hot_layers=[0, 1], shared=0.8, seed=2),
        TaskSpec(hot_layers=[2], shared=0.8, seed=3),
    ]
    base, tasks = make_family(tmp_path / "fam", shape, specs, shard_bytes=20_000)
    return base, tasks


def plan_json(folder):
    return json.loads((Path(folder) / "cpi_plan.json").read_text())
