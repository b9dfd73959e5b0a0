"""The toy benchmark's world: settings, the pretrained base (made once, cached), per-seed data.

The base is a small Llama pretrained here on the five tasks, mostly in their spelled-out
form plus a few tagged examples, so it has the skills, already follows the task tag and
partly solves every task in the tagged format the fine-tunes then train on: the closest
offline stand-in for a pretrained LLM being fine-tuned on task formats, small enough to
run dozens of fine-tunes within an hour on 2 CPU cores. The real model's world (SmolLM2)
is :mod:`benchmarks.quality.smollm2_world`; both share :class:`Setting`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.quality.tasks import pretraining_mixture, split, write_jsonl


@dataclass(frozen=True)
class Setting:
    """Every knob of a benchmark run (recorded next to its results)."""

    model: str = "toy"
    """``toy`` (the character-level Llama pretrained here) or ``smollm2``."""
    tasks: tuple[str, ...] = ("rev", "sort", "shift", "kv")
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 3000
    pretrain_lr: float = 3e-3
    pretrain_alias_per_task: int = 3000
    pretrain_tagged_per_task: int = 150
    batch: int = 32
    n_train: int = 3000
    n_eval: int = 200
    probe_steps: int = 100
    probe_lr: float = 2e-4
    samples_per_task: int = 256
    consolidation_steps_per_task: int = 40
    consolidation_lr: float = 2e-4
    core_fraction: float = 0.01
    tau: float = 0.1
    omega: float = 0.5
    task_arithmetic_lambda: float = 0.5
    ties_density: float = 0.2
    seeds: tuple[int, ...] = (0, 1, 2)
    forgetting_pair: tuple[str, str] = ("rev", "sort")
    tau_sweep: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.5)
    p_sweep: tuple[float, ...] = (0.001, 0.01, 0.05)
    max_length: int = 32
    """Tokens per training example (longer ones are cut)."""
    general_windows: int = 0
    """Windows of held-out general text scored per model (0: none)."""
    general_window: int = 128
    keep_weights: bool = True
    """False: delete a model's weights once it is scored and no later row reads it."""

    def base_signature(self) -> str:
        """What the pretrained base depends on (its cache key)."""
        keys = (
            "tasks",
            "hidden",
            "layers",
            "heads",
            "pretrain_steps",
            "pretrain_lr",
            "batch",
            "pretrain_alias_per_task",
            "pretrain_tagged_per_task",
            "n_eval",
        )
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def as_dict(self) -> dict:
        """Plain dict for the results file."""
        return asdict(self)


FULL = Setting()
QUICK = replace(
    FULL,
    tasks=("rev", "sort", "shift"),
    hidden=64,
    layers=2,
    pretrain_steps=300,
    pretrain_alias_per_task=600,
    pretrain_tagged_per_task=20,
    n_train=600,
    n_eval=60,
    probe_steps=20,
    samples_per_task=32,
    consolidation_steps_per_task=8,
    seeds=(0,),
    tau_sweep=(0.0, 0.1),
    p_sweep=(0.01,),
)


def training(steps: int | None, lr: float, batch: int, *, max_length: int = 32, **extra) -> dict:
    """A ``training:`` section for the product's configs (``steps``: per stage, if given)."""
    section = {
        "learning_rate": lr,
        "per_device_train_batch_size": batch,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_length": max_length,
        "logging_steps": max(1, (steps or 50) // 10),
        "lr_scheduler_type": "constant",
    }
    if steps is not None:
        section["max_steps_per_stage"] = steps
    return {**section, **extra}


def task_data(root: Path, setting: Setting, seed: int) -> tuple[dict[str, Path], dict[str, list]]:
    """Write each task's train pool (seeded) and return it with the held-out rows."""
    if setting.model == "smollm2":
        from benchmarks.quality.real_tasks import split as splitter
    else:
        splitter = split
    pools, held_out = {}, {}
    for task in setting.tasks:
        train, evaluation = splitter(task, setting.n_train, setting.n_eval, seed=seed)
        pools[task] = write_jsonl(root / f"seed{seed}" / "data" / f"{task}.jsonl", train)
        held_out[task] = evaluation
    return pools, held_out


def pretrained_base(cache: Path, setting: Setting, *, progress: bool = False) -> Path:
    """The pretrained base for ``setting``: made once (a few minutes), then reused.

    It is trained with the product's own stage runner on a mixture of every task (seed 0
    train pools), cosine schedule, and saved with its character tokenizer.
    """
    folder = cache / f"base-{setting.base_signature()}"
    if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    import torch

    from benchmarks.tiny_models import char_tokenizer, tiny_llama
    from consolidation.config import TrainingConfig
    from consolidation.data.examples import read_jsonl
    from consolidation.data.tokenize import build_dataset, pad_collate
    from consolidation.models import save_model
    from consolidation.training.trainer import build_optimizer, run_stage

    tokenizer = char_tokenizer()
    model = tiny_llama(
        len(tokenizer), hidden=setting.hidden, layers=setting.layers, heads=setting.heads, seed=0
    )
    held_out = {t: split(t, 0, setting.n_eval)[1] for t in setting.tasks}
    mixture = pretraining_mixture(
        setting.tasks, setting.pretrain_alias_per_task, setting.pretrain_tagged_per_task, held_out
    )
    path = write_jsonl(cache / "pretraining.jsonl", mixture)
    dataset = build_dataset(read_jsonl(path), tokenizer, 48, what="pretraining mixture")
    cfg = TrainingConfig(
        **{
            **training(setting.pretrain_steps, setting.pretrain_lr, setting.batch),
            "lr_scheduler_type": "cosine",
            "warmup_steps": 50,
            "max_length": 48,
        }
    )
    partial = cache / f".base-{setting.base_signature()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run_stage(
        model,
        dataset,
        pad_collate(tokenizer.pad_token_id),
        cfg,
        output_dir=partial / "pretraining",
        optimizer=build_optimizer(model, cfg),
        seed=0,
        progress=progress,
        resume=False,
    )
    shutil.rmtree(partial / "pretraining", ignore_errors=True)
    save_model(model, tokenizer, partial, torch.float32)
    partial.rename(folder)
    return folder
