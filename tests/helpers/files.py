"""Writing and reading tiny model folders and recipes for tests (no mergekit involved)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from benchmarks.synthetic import write_checkpoint


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


def load_folder(folder):
    """Read every tensor of a model folder directly with safetensors (no mergekit)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def plan_json(folder):
    """The plan file of a folder, as plain JSON."""
    return json.loads((Path(folder) / "cpi_plan.json").read_text())


def merged(recipe, out, **kw):
    """cpi-merge as a function, quiet unless options are given."""
    from mergekit.options import MergeOptions

    kw.setdefault("options", MergeOptions(quiet=True))
    from cpi_merge.commands import merge

    return merge(recipe, out, **kw)
