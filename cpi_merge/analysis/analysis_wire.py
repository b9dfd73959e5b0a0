"""An :class:`~cpi_merge.analysis.run.Analysis` as bytes: a JSON header plus raw arrays.

How the forked analysis (:mod:`cpi_merge.analysis.forked`) hands its result to the
parent without pickle: the plan as JSON (its own fields, floats written exactly), the
core positions' layout as JSON, and each position array as its raw bytes (copied once,
into buffers the receiver allocates from the header).
"""

from __future__ import annotations

import json

import numpy as np

from cpi_merge.analysis.core_rule import CoreBoundary
from cpi_merge.analysis.known_cores import KnownCores
from cpi_merge.analysis.plan import CorePlan
from cpi_merge.analysis.run import Analysis


def encode_analysis(analysis: Analysis) -> tuple[bytes, list[np.ndarray]]:
    """The header and the arrays to send, in order."""
    cores, layout, arrays = analysis.cores, None, []
    if cores is not None:
        layout = {
            "boundaries": [
                [b.threshold, b.tie_base_abs, b.tie_hash, b.seed] for b in cores.boundaries
            ],
            "tensors": [
                [name, cores.numel[name], [[a.dtype.str, a.size] for a in per_task]]
                for name, per_task in cores.positions.items()
            ],
        }
        arrays = [np.ascontiguousarray(a) for per in cores.positions.values() for a in per]
    header = {"plan": analysis.plan.model_dump(), "cores": layout}
    return json.dumps(header).encode(), arrays


def buffer_sizes(header: bytes) -> list[int]:
    """Bytes of each array that follows ``header``, in order."""
    layout = json.loads(header)["cores"]
    if layout is None:
        return []
    return [np.dtype(d).itemsize * n for _, _, arrays in layout["tensors"] for d, n in arrays]


def decode_analysis(header: bytes, buffers: list[bytearray]) -> Analysis:
    """The analysis from its header and the arrays' bytes (used in place, not copied)."""
    data = json.loads(header)
    plan = CorePlan.model_validate(data["plan"])
    layout = data["cores"]
    if layout is None:
        return Analysis(plan, None)
    raw = iter(buffers)
    positions, numel = {}, {}
    for name, n, arrays in layout["tensors"]:
        positions[name] = tuple(np.frombuffer(next(raw), dtype=d) for d, _ in arrays)
        numel[name] = n
    boundaries = tuple(CoreBoundary(t, a, h, seed=s) for t, a, h, s in layout["boundaries"])
    return Analysis(plan, KnownCores(boundaries, positions, numel))
