"""What a run was started with, so ``--resume`` never mixes two different runs.

A fresh run writes ``run.json`` into its work folder: the config, the SHA-256 of the plan
and of every data file, the model folder's files (names, sizes, modification times), the
number of processes and how the model is sharded. ``--resume`` recomputes it and refuses
any difference, naming every changed field (``training.learning_rate: 0.01 -> 0.02``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from cpi_merge.errors import ResumeError

FINGERPRINT_FILE = "run.json"


def _sha256(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _stamps(folder: str) -> dict[str, list[int]]:
    path = Path(folder)
    if not path.is_dir():
        return {}
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")
    }


def run_fingerprint(
    cfg, *, world_size: int, plan: str | Path | None = None, sharding: Any = None
) -> dict[str, Any]:
    """The fingerprint of a consolidation or probe run (see the module docstring)."""
    return {
        "sharding": dataclasses.asdict(sharding) if sharding is not None else None,
        "config": cfg.model_dump(mode="json"),
        "plan": _sha256(plan) if plan is not None else None,
        "model": {part: _stamps(part) for part in cfg.model.split("+")},
        "data": {task: _sha256(path) for task, path in cfg.data.items()},
        "world_size": world_size,
    }


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def check_same_run(work: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume a run started with anything else.

    Raises:
        ResumeError: The work folder holds no fingerprint, or a different one.
    """
    path = work / FINGERPRINT_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ResumeError(
            f"{work} has no readable {FINGERPRINT_FILE}: it cannot be checked against this "
            "run; pass --force to start over"
        ) from None
    before, now = _flat(stored), _flat(json.loads(json.dumps(fingerprint)))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        shown = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8]]
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ResumeError(
            "--resume refused: this run differs from the interrupted one in "
            + "; ".join(shown)
            + more
            + ". Resume with the same config, plan, model and data, or pass --force to "
            "start over"
        )


def write_fingerprint(work: Path, fingerprint: dict[str, Any]) -> None:
    """Record the fingerprint of a fresh run."""
    work.mkdir(parents=True, exist_ok=True)
    (work / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1) + "\n")
