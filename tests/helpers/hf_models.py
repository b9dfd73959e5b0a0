"""Families of tiny Hugging Face models (a base and perturbed task copies), for merge tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from benchmarks.tiny_models import tiny_config

ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def _config(arch: str, tied: bool):
    if arch == "gpt2":
        return tiny_config(
            "gpt2",
            vocab=96,
            hidden=16,
            layers=2,
            heads=2,
            max_positions=32,
            tied=tied,
            bos_token_id=0,
            eos_token_id=0,
        )
    return tiny_config(
        arch, vocab=96, hidden=16, intermediate=40, layers=2, heads=2, kv_heads=1, tied=tied
    )


def make_hf_family(
    root, arch="llama", *, tied=False, dtype=torch.float32, n_tasks=3, shard="30KB", step=0.02
):
    """Save base + n_tasks perturbed copies; return (base_dir, [task_dirs])."""
    torch.manual_seed(0)
    config = _config(arch, tied)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    base = root / "base"
    model.save_pretrained(base, max_shard_size=shard)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = []
    for i in range(n_tasks):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g) * step
                # each task leans on a different layer, like a real fine-tune
                if f".{i % 2}." in name:
                    noise *= 5
                p.copy_((state[name].float() + noise).to(dtype))
        folder = root / f"task_{i}"
        model.save_pretrained(folder, max_shard_size=shard)
        tasks.append(folder)
    return base, tasks
