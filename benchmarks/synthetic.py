"""Synthetic Llama-shaped checkpoint families (a base and fine-tunes of it), made on the fly.

Used by the tests and the speed benchmark (not part of the wheel): no download, any size. Each fine-tune is
``θ0 + dense noise + a stronger update on its "hot" layers``, so tasks that share hot
layers have overlapping cores — like real fine-tunes that lean on the same blocks.
Every tensor is generated from its own seed, so a family of any size is written one
shard at a time without holding a model in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions of a Llama-style decoder."""

    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    tie_embeddings: bool = False

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of every stored tensor, in Hugging Face Llama naming."""
        h, i = self.hidden, self.intermediate
        kv = h * self.kv_heads // self.heads
        shapes = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            shapes += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        shapes.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            shapes.append(("lm_head.weight", (self.vocab, h)))
        return shapes

    @property
    def num_parameters(self) -> int:
        """Entries over all stored tensors."""
        total = 0
        for _, shape in self.tensor_shapes():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def hf_config(self, dtype: torch.dtype) -> dict:
        """A ``config.json`` that transformers and mergekit read as LlamaForCausalLM."""
        from benchmarks.tiny_models import tiny_config

        config = tiny_config(
            vocab=self.vocab,
            hidden=self.hidden,
            intermediate=self.intermediate,
            layers=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            max_positions=256,
            tied=self.tie_embeddings,
            architectures=["LlamaForCausalLM"],
        ).to_dict()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        config["dtype"] = config["torch_dtype"]
        return config


# A ~0.47B-parameter Llama shape for the speed benchmark (Llama-2 vocabulary).
BENCH_SHAPE = LlamaShape(
    vocab=32000, hidden=1024, intermediate=4096, layers=24, heads=16, kv_heads=16
)


@dataclass(frozen=True)
class TaskSpec:
    """How one synthetic fine-tune differs from the base."""

    hot_layers: Sequence[int] = ()
    dense_scale: float = 1e-3
    hot_scale: float = 1e-2
    shared: float = 0.0
    """Correlation (0..1) of the hot update with a pattern every task shares."""
    seed: int = 1


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The base value of a tensor: ones for norms, N(0, 0.02²) elsewhere (float32)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=_generator(seed, name)) * 0.02


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for p in parts:
        if p.isdigit():
            return int(p)
    return None


def task_tensor(name: str, base: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """A fine-tuned value of a tensor (float32) for ``spec``."""
    noise = torch.randn(base.shape, generator=_generator(spec.seed, name))
    if _layer_of(name) not in set(spec.hot_layers):
        return base + noise * spec.dense_scale
    if spec.shared > 0:
        common = torch.randn(base.shape, generator=_generator(-1, name))
        noise = spec.shared * common + (1 - spec.shared**2) ** 0.5 * noise
    return base + noise * spec.hot_scale


def write_checkpoint(
    folder: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    *,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write tensors as a Hugging Face model folder (``model.safetensors`` or shards + index).

    Args:
        folder: Destination (created).
        tensors: Name → tensor, written in this order.
        config: ``config.json`` content, if any.
        max_shard_bytes: Split into ``model-0000i-of-0000n.safetensors`` shards of at most
            this many bytes (a tensor is never split).

    Returns:
        The folder.

    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return folder
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def _write_streamed(folder: Path, shape: LlamaShape, dtype, config, shard_bytes, value_of) -> None:
    """Write a model shard by shard, generating each tensor only when its shard is written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shape.tensor_shapes():
        nbytes = itemsize * int(torch.Size(shp).numel())
        if shard_bytes and plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shp))
        size += nbytes
    weight_map = {}
    for n, members in enumerate(plan, 1):
        fname = (
            "model.safetensors"
            if len(plan) == 1
            else f"model-{n:05d}-of-{len(plan):05d}.safetensors"
        )
        shard = {name: value_of(name, shp).to(dtype) for name, shp in members}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        del shard
    if len(plan) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_family(
    root: str | os.PathLike,
    shape: LlamaShape,
    tasks: Sequence[TaskSpec],
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int | None = None,
    names: Sequence[str] | None = None,
    resume: bool = False,
    limit: int | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and one folder per task spec.

    Args:
        root: Parent folder.
        shape: Model dimensions.
        tasks: One :class:`TaskSpec` per fine-tune.
        dtype: Stored dtype.
        seed: Seed of the base weights.
        shard_bytes: Shard size limit (None: one file per model).
        names: Folder names of the tasks (default ``task_0``, ``task_1``…).
        resume: Skip the models a previous call finished (a ``root/.<name>.complete``
            marker is written after each model): a large family can be made in steps.
        limit: Write only the first this many models (base first), for making a large
            family in steps; the folders of all of them are returned.

    Returns:
        ``(base folder, task folders)``.

    """
    root = Path(root)
    config = shape.hf_config(dtype)
    base_dir = root / "base"
    members = [(base_dir, lambda name, shp: base_tensor(name, shp, seed))]
    task_dirs = []
    for n, spec in enumerate(tasks):
        folder = root / (names[n] if names else f"task_{n}")
        members.append(
            (
                folder,
                lambda name, shp, spec=spec: task_tensor(name, base_tensor(name, shp, seed), spec),
            )
        )
        task_dirs.append(folder)
    for folder, value_of in members[: None if limit is None else limit]:
        done = root / f".{folder.name}.complete"  # outside the folder: not a model file
        if resume and done.exists():
            continue
        _write_streamed(folder, shape, dtype, config, shard_bytes, value_of)
        done.write_text("ok")
    return base_dir, task_dirs
