"""LoRA references (``path/to/base+path/to/adapter``), as mergekit accepts them.

A LoRA task is merged into its base once, by mergekit's own code (PEFT's
``merge_and_unload``, into ``--lora-merge-cache``), and then read like any checkpoint, so
the analysis sees exactly the weights the merge will. ``cpi-merge`` hands mergekit the
same cache, so the adapter is merged once per run. Without a cache folder of the user's,
a temporary one beside the output is used and removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cpi_merge.errors import CheckpointError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def is_lora(reference: str) -> bool:
    """Whether a reference names a base model plus a LoRA adapter."""
    return "+" in reference


def resolved_lora_reference(reference: str) -> str:
    """``base+adapter`` with each local part as an absolute path (Hub ids unchanged)."""
    return "+".join(os.path.abspath(p) if os.path.isdir(p) else p for p in reference.split("+"))


@dataclass(frozen=True)
class LoraCache:
    """Where LoRA references are merged, and in which dtype (mergekit's options)."""

    folder: str
    dtype: str | None = None

    def merged_folder(self, reference: str, *, role: str, allow_pickle: bool = False) -> str:
        """Merge the adapter into its base (once; mergekit reuses the cache) and return it.

        Raises:
            CheckpointError: The reference is malformed, the adapter is missing or stored
                as pickle only, or PEFT cannot apply it.
        """
        parts = reference.split("+")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{role} {reference!r}: expected 'base+adapter'")
        base, adapter = parts
        if os.path.isdir(adapter):
            files = set(os.listdir(adapter))
            if "adapter_config.json" not in files:
                raise CheckpointError(
                    f"{role} {reference!r}: {adapter} holds no adapter_config.json (a PEFT "
                    "LoRA adapter folder is expected after '+')"
                )
            if "adapter_model.safetensors" not in files and not allow_pickle:
                raise CheckpointError(
                    f"{role} {reference!r}: the adapter is stored as pickle only "
                    "(adapter_model.bin); convert it to safetensors or pass --allow-pickle"
                )
        elif not os.path.exists(adapter) and adapter.startswith((".", "/", "~")):
            raise CheckpointError(f"{role} {reference!r}: no such adapter folder {adapter!r}")
        from mergekit.common import ModelReference

        try:
            ref = ModelReference.parse(resolved_lora_reference(reference))
            merged = ref.merged(
                cache_dir=self.folder, trust_remote_code=False, lora_merge_dtype=self.dtype
            )
        except Exception as exc:  # transformers/PEFT raise many types; all mean "unusable"
            raise CheckpointError(
                f"{role} {reference!r}: merging the adapter into its base failed "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return merged.model.path


@contextmanager
def lora_cache(
    references: list[str],
    folder: str | None,
    dtype: str | None,
    *,
    beside: str | os.PathLike | None,
) -> Iterator[LoraCache | None]:
    """The LoRA cache for a run: the user's folder, or a temporary one removed at the end.

    Args:
        references: Every model reference of the run (None is yielded when none is a LoRA).
        folder: The user's cache folder (kept), or None.
        dtype: mergekit's ``lora_merge_dtype``.
        beside: A path whose parent holds the temporary cache (the output: same disk);
            None: the system's temporary folder.
    """
    if not any(is_lora(r) for r in references):
        yield None
        return
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield LoraCache(str(folder), dtype)
        return
    parent = None
    if beside is not None:
        parent = Path(beside).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=".cpi-lora-cache-", dir=parent)
    try:
        yield LoraCache(temporary, dtype)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
