"""The real-model tier's world: SmolLM2-135M-Instruct and community-style fine-tunes of it.

Made once per cache folder (``.cache/cpi-real`` by default, ``CPI_REAL_CACHE`` to move it)
and reused: the de-quantized bf16 base (:mod:`benchmarks.smollm2`), then short fine-tunes
saved the ways community checkpoints are saved:

* ``upper`` (uppercase a word): a probe, re-saved as sharded bf16 (index + shards);
* ``reverse`` (reverse a word): a probe, re-saved as one fp16 file;
* ``tool`` (answer with an added special token ``<|tool|>``): the base with one more
  token (vocabulary 49,153, rows resized), then a probe of it, bf16;
* ``first`` (first letter of a word): a LoRA adapter of the base (PEFT, safetensors).

Probes are trained by the product itself (``cpi-consolidate probe``), a few steps each.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import yaml

from benchmarks.smollm2 import DEFAULT_CACHE, base_folder

VERSION = "world-v1"
TOOL = "<|tool|>"
WORDS = (
    "apple river stone cloud garden silver forest candle mirror bridge planet window "
    "meadow harbor lantern orange pencil rocket shadow thunder violet wander yellow zebra "
    "anchor basket copper desert engine falcon glacier hollow island jacket kettle lemon"
).split()
TRAINING = {
    "learning_rate": 5.0e-5,
    "max_steps_per_stage": 6,
    "per_device_train_batch_size": 4,
    "weight_decay": 0.0,
    "max_length": 48,
    "logging_steps": 1,
    "lr_scheduler_type": "constant",
}


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    """Conversational prompt-completion examples of one task (TRL's format)."""
    rng = random.Random(f"{task}:{seed}")
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        question, answer = {
            "upper": (f"Uppercase: {word}", word.upper()),
            "reverse": (f"Reverse: {word}", word[::-1]),
            "tool": (f"Call the tool on: {word}", f"{TOOL} {word}"),
            "first": (f"First letter of: {word}", word[0]),
        }[task]
        rows.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _probe(base: Path, tasks: list[str], root: Path, data: Path) -> Path:
    from consolidation.probe import run_probes

    cfg = {
        "model": str(base),
        "data": {t: str(_write_jsonl(data / f"{t}.jsonl", task_rows(t, 64, 0))) for t in tasks},
        "samples_per_task": 24,
        "training": TRAINING,
    }
    path = root / f"probe-{'-'.join(tasks)}.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / f"probes-{'-'.join(tasks)}"
    run_probes(path, out, force=True, progress=False)
    return out


def _resave(source: Path, target: Path, dtype: torch.dtype, shard: str | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(target, safe_serialization=True, **kwargs)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)


def _with_added_token(base: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [TOOL]})
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _lora(base: Path, target: Path, data: Path) -> None:
    """A LoRA adapter trained a few steps on the ``first`` task (plain torch loop)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from consolidation.data.examples import read_jsonl
    from consolidation.data.tokenize import build_dataset, collator

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(model, config)
    rows = read_jsonl(_write_jsonl(data / "first.jsonl", task_rows("first", 32, 0)))
    dataset = build_dataset(rows, tokenizer, 48, what="first")
    collate = collator(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(6):
        batch = collate([dataset[(4 * step + i) % len(dataset)] for i in range(4)])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(target, safe_serialization=True)


def real_world(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """The base and the four community-style fine-tunes (made once, then reused)."""
    base = base_folder(cache)
    root = cache / VERSION
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        data = root / "data"
        data.mkdir(parents=True)
        probes = _probe(base, ["upper", "reverse"], root, data)
        _resave(probes / "upper", root / "upper", torch.bfloat16, shard="100MB")
        _resave(probes / "reverse", root / "reverse", torch.float16, shard=None)
        _with_added_token(base, root / "base_tool")
        tool = _probe(root / "base_tool", ["tool"], root, data)
        shutil.move(str(tool / "tool"), str(root / "tool"))
        _lora(base, root / "first_adapter", data)
        for folder in ("probes-upper-reverse", "probes-tool", "base_tool"):
            shutil.rmtree(root / folder)
        (root / "done").write_text("ok")
    return {
        "base": base,
        "upper": root / "upper",
        "reverse": root / "reverse",
        "tool": root / "tool",
        "adapter": root / "first_adapter",
        "data": root / "data",
    }
