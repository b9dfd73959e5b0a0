"""Sealing a folder of training state: its files' sizes and SHA-256, written last.

A checkpoint or a stage's end state counts only when its seal is there and every file
still matches it: a half-written folder has no seal, and a file damaged afterwards (a bit
flip, a truncated copy) fails the check with its name, instead of crashing the resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpi_merge.io.manifest import hash_file

SEAL = ".cpi-complete"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL)


def seal(folder: Path, **extra: Any) -> None:
    """Record every file of ``folder`` (size, SHA-256) and ``extra`` in its seal."""
    files = {str(p.relative_to(folder)): hash_file(p) for p in _files(folder)}
    (folder / SEAL).write_text(json.dumps({**extra, "files": files}, indent=1) + "\n")


def read_seal(folder: Path) -> dict[str, Any] | None:
    """The seal of ``folder``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / SEAL).read_text())
    except (OSError, ValueError):
        return None


def seal_problems(folder: Path) -> list[str]:
    """What is wrong with a sealed folder: missing, resized or changed files (empty: fine)."""
    record = read_seal(folder)
    if record is None:
        return [f"{folder / SEAL}: missing or unreadable"]
    files = record.get("files")
    if not isinstance(files, dict):
        return [f"{folder / SEAL}: records no files"]
    problems = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected.get("bytes"):
            problems.append(f"{path}: {path.stat().st_size} bytes, sealed with {expected['bytes']}")
        elif hash_file(path)["sha256"] != expected.get("sha256"):
            problems.append(f"{path}: contents changed since it was saved (SHA-256 differs)")
    return problems
