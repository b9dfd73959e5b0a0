"""A model folder's layout and shard headers, checked before any tensor data is read.

Missing or stale shards, unsafe names in the index, tensors the index does not list, a
folder with both a single file and an index, and pickle files (refused unless allowed)
are errors naming the folder and file, so a bad input fails in seconds.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator

import safetensors
import torch

from cpi_merge.errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HF_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def read_index(folder: str, index_file: str) -> dict[str, str]:
    """The index's ``weight_map``, with every shard name checked to stay inside the folder."""
    path = os.path.join(folder, index_file)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable shard index ({exc})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: 'weight_map' is not a mapping")
    for name, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or os.path.isabs(shard)
            or shard != os.path.basename(shard)
            or shard in ("", ".", "..")
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r} points to {shard!r}; shard names must be plain "
                "file names inside the model folder"
            )
    return weight_map


def safetensors_header(path: str) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor of a safetensors file, from its header."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has unsupported dtype {piece.get_dtype()}"
                    )
                yield name, tuple(piece.get_shape()), dtype
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError for bad files
        duplicates = _duplicate_names(path)
        if duplicates:
            raise CheckpointError(
                f"{path}: the header names tensor(s) {duplicates[:5]} more than once "
                "(duplicate tensor name); the file is malformed"
            ) from None
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _duplicate_names(path: str) -> list[str]:
    """Tensor names that a safetensors header lists twice (safetensors reports a bad offset)."""
    objects: list[list[str]] = []  # the keys of every JSON object; the header's comes last

    def pairs(items):
        objects.append([key for key, _ in items])
        return dict(items)

    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                return []
            json.loads(f.read(size), object_pairs_hook=pairs)
    except (OSError, ValueError):
        return []
    counts = Counter(objects[-1] if objects else [])
    return sorted(n for n, c in counts.items() if c > 1)


def pickle_header(path: str) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor of a pickle checkpoint (nothing executed)."""
    from mergekit.io.loader import LazyPickleLoader

    try:
        index = LazyPickleLoader(path).index
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    for name, deferred in index.items():
        yield name, tuple(deferred.shape), deferred.dtype


def folder_layout(folder: str, allow_pickle: bool) -> tuple[bool, dict[str, list[str]] | None, str]:
    """Return (is_safetensors, {shard: listed tensor names} or None, single file)."""
    files = set(os.listdir(folder))
    if "model.safetensors" in files and "model.safetensors.index.json" in files:
        raise CheckpointError(
            f"{folder}: holds both model.safetensors and model.safetensors.index.json; "
            "remove the stale one so it is clear which weights to read"
        )
    for single, index_file, is_st in (
        ("model.safetensors", "model.safetensors.index.json", True),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", False),
    ):
        if single not in files and index_file not in files:
            continue
        if not is_st and not allow_pickle:
            raise CheckpointError(
                f"{folder}: only pickle weights (pytorch_model.bin) found. Pickle can run code "
                "when loaded; convert to safetensors, or pass --allow-pickle if you trust it"
            )
        if index_file not in files:
            return is_st, None, single
        weight_map = read_index(folder, index_file)
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        missing = sorted(s for s in shards if s not in files)
        if missing:
            raise CheckpointError(f"{folder}: the shard index names missing file(s) {missing}")
        if is_st:
            stale = sorted(f for f in files if _HF_SHARD.match(f) and f not in shards)
            if stale:
                raise CheckpointError(
                    f"{folder}: shard file(s) {stale} are not listed in {index_file} "
                    "(left over from an earlier save?); remove them"
                )
        return is_st, shards, ""
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors or model.safetensors.index.json)"
    )
