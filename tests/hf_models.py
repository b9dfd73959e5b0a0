"""Tiny Hugging Face models of several architectures, built from a config (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

_LLAMA_LIKE = dict(
    vocab_size=96,
    hidden_size=16,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
CONFIGS = {
    "llama": lambda tied: LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=tied),
    "mistral": lambda tied: MistralConfig(**_LLAMA_LIKE, tie_word_embeddings=tied),
    "qwen2": lambda tied: Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=tied),
    "gpt2": lambda tied: GPT2Config(
        vocab_size=96,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


def make_hf_family(
    root, arch="llama", *, tied=False, dtype=torch.float32, n_tasks=3, shard="30KB", step=0.02
):
    """Save base + n_tasks perturbed copies; return (base_dir, [task_dirs])."""
    torch.manual_seed(0)
    config = CONFIGS[arch](tied)
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
