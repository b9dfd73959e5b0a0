"""Open checkpoints through mergekit's loading layer, after checking them from their headers.

A reference is whatever a mergekit recipe accepts as ``model:``: a local folder or a
Hugging Face Hub id (``org/name``, optionally ``@revision``). Before any tensor data is
read, the folder's layout and every shard header are checked (missing or stale shards,
unsafe names in the index, tensors the index does not list, pickle files), so a bad
input fails in seconds, not after a long pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

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
_VOCAB = re.compile(r"embed|lm_head|wte|output\.weight$|word_embeddings")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint's header says about one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str

    @property
    def numel(self) -> int:
        """Number of entries."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        """Whether the tensor holds floating-point values (the ones that are merged)."""
        return self.dtype.is_floating_point


@dataclass
class Checkpoint:
    """A checkpoint whose layout and headers have been checked.

    Attributes:
        reference: The reference exactly as written in the recipe.
        path: The local folder holding it.
        tensors: Header information for every stored tensor, by name.
        is_safetensors: False only for pickle checkpoints the user allowed.

    """

    reference: str
    path: str
    tensors: dict[str, TensorInfo]
    is_safetensors: bool = True

    @cached_property
    def loader(self):
        """Mergekit's lazy tensor loader for this folder."""
        from mergekit.io import LazyTensorLoader, ShardedTensorIndex

        return LazyTensorLoader(ShardedTensorIndex.from_disk(self.path), lazy_unpickle=True)

    def close(self) -> None:
        """Unmap the shard the loader holds open (it reopens on the next :meth:`get`)."""
        if "loader" in self.__dict__:
            self.__dict__.pop("loader").flush()

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only that tensor's bytes are read).

        Args:
            name: Tensor name as stored.

        Returns:
            The tensor, on the CPU, in its stored dtype.

        """
        return self.loader.get_tensor(name)

    @property
    def float_tensors(self) -> list[TensorInfo]:
        """Floating-point tensors, in shard order then name order."""
        return sorted(
            (t for t in self.tensors.values() if t.is_float), key=lambda t: (t.shard, t.name)
        )


def resolve_local_path(reference: str, *, role: str) -> str:
    """Map a recipe reference to a local folder, downloading from the Hub if needed.

    Args:
        reference: A local folder, or a Hub id ``org/name[@revision]``.
        role: What the model is in the recipe (``base_model``, ``task 2``), for errors.

    Returns:
        The local folder.

    Raises:
        CheckpointError: The reference is a LoRA, does not exist, or cannot be fetched.

    """
    if "+" in reference:
        raise CheckpointError(
            f"{role} {reference!r}: LoRA references (model+adapter) are not supported; "
            "merge the adapter into a full checkpoint first (e.g. peft merge_and_unload)"
        )
    if os.path.isdir(reference):
        return reference
    if os.path.exists(reference):
        raise CheckpointError(
            f"{role} {reference!r} is a file; expected a model folder (config.json + weights)"
        )
    if not _HUB_ID.match(reference) or reference.startswith((".", "/", "~")):
        raise CheckpointError(f"{role} {reference!r}: no such folder")
    from mergekit.common import ModelReference

    try:
        return ModelReference.parse(reference).local_path()
    except Exception as exc:  # huggingface_hub raises many types; all mean "not reachable"
        raise CheckpointError(
            f"{role} {reference!r}: not a local folder, and fetching it from the Hugging Face "
            f"Hub failed ({type(exc).__name__}: {exc}). Download it first or fix the path."
        ) from None


def _read_index(folder: str, index_file: str) -> dict[str, str]:
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


def _safetensors_header(path: str) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
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
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _pickle_header(path: str) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    from mergekit.io.loader import LazyPickleLoader

    try:
        index = LazyPickleLoader(path).index
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    for name, deferred in index.items():
        yield name, tuple(deferred.shape), deferred.dtype


def _layout(folder: str, allow_pickle: bool) -> tuple[bool, dict[str, list[str]] | None, str]:
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
        weight_map = _read_index(folder, index_file)
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


def open_checkpoint(reference: str, *, role: str, allow_pickle: bool = False) -> Checkpoint:
    """Resolve a reference and check its layout and every shard header.

    Args:
        reference: A local folder or Hub id, as written in the recipe.
        role: What the model is in the recipe, for error messages.
        allow_pickle: Accept ``pytorch_model.bin`` checkpoints (unsafe: pickle).

    Returns:
        The opened :class:`Checkpoint` (no tensor data read yet).

    Raises:
        CheckpointError: Naming the folder, file and tensor at fault.

    """
    folder = resolve_local_path(reference, role=role)
    is_st, shards, single = _layout(folder, allow_pickle)
    header = _safetensors_header if is_st else _pickle_header
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(shards) if shards is not None else [single]:
        stored = set()
        for name, shape, dtype in header(os.path.join(folder, shard)):
            stored.add(name)
            if name in tensors:
                raise CheckpointError(
                    f"{folder}: tensor {name!r} is stored in both {tensors[name].shard} and {shard}"
                )
            tensors[name] = TensorInfo(name, shape, dtype, shard)
        if shards is not None:
            listed = set(shards[shard])
            if stored - listed:
                raise CheckpointError(
                    f"{folder}/{shard}: holds tensor(s) the index does not list: "
                    f"{sorted(stored - listed)[:5]}"
                )
            if listed - stored:
                raise CheckpointError(
                    f"{folder}/{shard}: the index lists tensor(s) this shard does not hold: "
                    f"{sorted(listed - stored)[:5]}"
                )
    return Checkpoint(reference=reference, path=folder, tensors=tensors, is_safetensors=is_st)


def check_compatible(base: Checkpoint, others: Sequence[tuple[str, Checkpoint]]) -> None:
    """Require every model to store the same floating-point tensors, with the same shapes.

    Args:
        base: θ0.
        others: ``(role, checkpoint)`` for every other model.

    Raises:
        CheckpointError: A tensor is missing, extra, or has another shape; all problems
            of every model are listed.

    """
    expected = {t.name: t.shape for t in base.float_tensors}
    problems = []
    for role, ckpt in others:
        found = {t.name: t.shape for t in ckpt.float_tensors}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        where = f"{role} {ckpt.reference!r}"
        if missing:
            problems.append(f"{where} lacks {len(missing)} tensor(s) of the base: {missing[:5]}")
        if extra:
            hint = " (tied vs untied embeddings?)" if any("lm_head" in n for n in extra) else ""
            problems.append(f"{where} has {len(extra)} tensor(s) the base lacks{hint}: {extra[:5]}")
        for name in sorted(set(expected) & set(found)):
            want, got = expected[name], found[name]
            if want == got:
                continue
            if _VOCAB.search(name) and want[1:] == got[1:] and len(want) == 2:
                problems.append(
                    f"{where}: vocabulary size differs in {name!r}: {got[0]:,} rows, base has "
                    f"{want[0]:,}. Cores compare entries one to one, so every model must use "
                    "the base's vocabulary: align them first (e.g. mergekit-tokensurgeon) "
                    "or drop the added tokens"
                )
            else:
                problems.append(
                    f"{where}: tensor {name!r} has shape {list(got)}, base has {list(want)}"
                )
    if problems:
        raise CheckpointError(
            "models do not match the base:\n" + "\n".join(f"  - {p}" for p in problems)
        )
