"""A tiny end-to-end world for consolidation tests: char tokenizer, base, data, probes, merge."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from benchmarks.tiny_models import char_tokenizer, tiny_llama


def task_examples(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{kind}:{seed}")
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        answer = {"rev": word[::-1], "sort": "".join(sorted(word)), "dup": word + word}[kind]
        rows.append({"prompt": f"{kind}:{word}>", "completion": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_base(root: Path, *, tied: bool = False, dtype: str | None = None) -> Path:
    import torch

    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), hidden=32, layers=2, heads=4, seed=0)
    if tied:  # one matrix for input and output embeddings, stored once
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


TRAINING = {
    "learning_rate": 0.01,
    "max_steps_per_stage": 3,
    "per_device_train_batch_size": 4,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "max_length": 32,
    "logging_steps": 1,
}


def build_world(root: Path, *, tied: bool = False, dtype: str | None = None) -> dict:
    """Base + data + probes + merged model; returns paths.

    Args:
        root: Where to build it.
        tied: Tie the input and output embeddings.
        dtype: Store base, probes and merge in this dtype (default float32).
    """
    from mergekit.options import MergeOptions

    from consolidation.probe import RECIPE_FILE, run_probes
    from cpi_merge.commands import merge

    base = make_base(root, tied=tied, dtype=dtype)
    data = {
        k: write_jsonl(root / f"{k}.jsonl", task_examples(k, 24, 0)) for k in ("rev", "sort", "dup")
    }
    probe_cfg = root / "probe.yml"
    probe_cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(base),
                "data": {k: str(v) for k, v in data.items()},
                "training": TRAINING,
            }
        )
    )
    run_probes(probe_cfg, root / "probes", progress=False)
    recipe = yaml.safe_load((root / "probes" / RECIPE_FILE).read_text())
    recipe["parameters"] = {"core_fraction": 0.02, "tau": 0.2}
    if dtype is not None:
        recipe["dtype"] = dtype
    (root / "recipe.yml").write_text(yaml.safe_dump(recipe))
    merge(root / "recipe.yml", root / "merged", options=MergeOptions(quiet=True))
    return {"base": base, "data": data, "merged": root / "merged", "probes": root / "probes"}


def consolidation_config(root: Path, world: dict, name: str = "cons.yml", **overrides) -> Path:
    doc = {
        "model": str(world["merged"]),
        "data": {k: str(v) for k, v in world["data"].items()},
        "samples_per_task": 8,
        "seed": 0,
        "training": dict(TRAINING),
    }
    training = overrides.pop("training", {})
    doc["training"].update(training)
    doc.update(overrides)
    path = root / name
    path.write_text(yaml.safe_dump(doc))
    return path
