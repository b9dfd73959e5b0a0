"""Where each task's core lives: core density per layer and per module kind.

Tensor names are split at their first numeric component (``model.layers.7.mlp.up_proj.weight``
→ layer 7, module ``mlp.up_proj.weight``); tensors without one (embeddings, final norm,
head) are their own blocks, before the layers when they are embeddings, after otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cpi_merge.analysis.plan import CorePlan

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<module>.+)$")


@dataclass(frozen=True)
class DensityTable:
    """Core density (fraction of a block's entries in the core), tasks × blocks."""

    blocks: list[str]
    density: np.ndarray


def _split(name: str) -> tuple[int | None, str]:
    m = _LAYER.match(name)
    if m is None:
        return None, name
    return int(m["index"]), m["module"]


def _short(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("weight", "model")]
    return ".".join(parts[-2:]) if parts else name


def _table(plan: CorePlan, key_of) -> DensityTable:
    keys: list[str] = []
    numel: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for t in plan.tensors:
        key = key_of(t.name)
        if key not in numel:
            keys.append(key)
            numel[key] = 0
            members[key] = []
        numel[key] += t.numel
        members[key].append(t.name)
    density = np.zeros((len(plan.tasks), len(keys)))
    for i, task in enumerate(plan.tasks):
        for j, key in enumerate(keys):
            density[i, j] = sum(task.per_tensor[n] for n in members[key]) / max(1, numel[key])
    return DensityTable(keys, density)


def density_by_layer(plan: CorePlan) -> DensityTable:
    """Core density per layer; non-layer tensors are blocks of their own."""

    def key_of(name: str) -> str:
        layer, _ = _split(name)
        return f"L{layer}" if layer is not None else _short(name)

    table = _table(plan, key_of)
    layers = sorted((b for b in table.blocks if re.fullmatch(r"L\d+", b)), key=lambda b: int(b[1:]))
    others = [b for b in table.blocks if b not in layers]
    pre = [b for b in others if "embed" in b or "wte" in b]
    post = [b for b in others if b not in pre]
    order = [table.blocks.index(b) for b in pre + layers + post]
    return DensityTable([table.blocks[i] for i in order], table.density[:, order])


def density_by_module(plan: CorePlan) -> DensityTable:
    """Core density per module kind, summed over layers (``mlp.up_proj``, ``self_attn.q_proj``…)."""

    def key_of(name: str) -> str:
        layer, module = _split(name)
        return _short(module) if layer is not None else _short(name)

    return _table(plan, key_of)
