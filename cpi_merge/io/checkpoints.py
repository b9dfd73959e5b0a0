"""Open checkpoints through mergekit's loading layer, after checking them from their headers.

A reference is whatever a mergekit recipe accepts as ``model:``: a local folder or a
Hugging Face Hub id (``org/name``, optionally ``@revision``). Before any tensor data is
read, the folder's layout and every shard header are checked (missing or stale shards,
unsafe names in the index, tensors the index does not list, pickle files), so a bad
input fails in seconds, not after a long pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from cpi_merge.errors import CheckpointError
from cpi_merge.io.direct_read import ReadSlot, ShardReader
from cpi_merge.io.layout import folder_layout, pickle_header, safetensors_header
from cpi_merge.io.lora import LoraCache, is_lora, resolved_lora_reference

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
        on_read: Told of each tensor a full pass has read (:meth:`mark_read`); set by
            :meth:`Manifest.following <cpi_merge.io.manifest.Manifest.following>`.

    """

    reference: str
    path: str
    tensors: dict[str, TensorInfo]
    is_safetensors: bool = True
    on_read: Callable[[TensorInfo], None] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def loader(self):
        """Mergekit's lazy tensor loader for this folder."""
        from mergekit.io import LazyTensorLoader, ShardedTensorIndex

        return LazyTensorLoader(ShardedTensorIndex.from_disk(self.path), lazy_unpickle=True)

    def close(self) -> None:
        """Unmap the shard the loader holds open (it reopens on the next :meth:`get`).

        Also closes the file :meth:`read` keeps open.
        """
        self._close_reader()
        if "loader" in self.__dict__:
            self.__dict__.pop("loader").flush()

    def read(self, name: str, slot: ReadSlot | None = None) -> torch.Tensor:
        """Read one whole tensor, for a pass over every tensor.

        The tensor alone, not its shard, is read (:mod:`cpi_merge.io.direct_read`)
        instead of through the loader's mapping of the whole shard: a pass does not
        grow the resident memory by a mapped shard per checkpoint. Pickle checkpoints
        and dtypes the direct reader does not handle go through :meth:`get`. Only the
        current shard's file is kept open.

        Args:
            name: Tensor name as stored.
            slot: The read slot (the tensor is mapped into it, valid until the slot's
                next read; much faster than copying into fresh memory).

        Returns:
            The tensor, on the CPU, in its stored dtype.

        Raises:
            CheckpointError: The shard changed since it was checked (names the file).
        """
        info = self.tensors.get(name)
        if self.is_safetensors and info is not None:
            path = os.path.join(self.path, info.shard)
            reader = self.__dict__.get("_shard_reader")
            if reader is None or reader.path != path:
                self._close_reader()
                reader = self.__dict__["_shard_reader"] = ShardReader(path)
            tensor = reader.read(name, slot)
            if tensor is not None:
                return tensor
        return self.get(name)

    def _close_reader(self) -> None:
        reader = self.__dict__.pop("_shard_reader", None)
        if reader is not None:
            reader.close()

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only that tensor's bytes are read).

        Args:
            name: Tensor name as stored.

        Returns:
            The tensor, on the CPU, in its stored dtype.

        """
        return self.loader.get_tensor(name)

    def mark_read(self, name: str) -> None:
        """Say that every byte of tensor ``name`` has just been read (it is in the page cache).

        A pass over the whole model calls this after each tensor, so that the inputs'
        SHA-256 can be computed from the same read (:mod:`cpi_merge.io.follow_hash`).
        :meth:`get` alone does not: the tensor it returns is mapped, not read yet.
        """
        if self.on_read is not None and name in self.tensors:
            self.on_read(self.tensors[name])

    @property
    def float_tensors(self) -> list[TensorInfo]:
        """Floating-point tensors, in shard order then name order."""
        return sorted(
            (t for t in self.tensors.values() if t.is_float), key=lambda t: (t.shard, t.name)
        )


def resolved_reference(reference: str) -> str:
    """The reference as recorded in plans and handed to mergekit: local folders absolute.

    A plan read from another directory then still finds its models, and mergekit's model
    card never mistakes a relative ``dir/name`` for a Hub id (it would query the Hub).
    """
    if is_lora(reference):
        return resolved_lora_reference(reference)
    return os.path.abspath(reference) if os.path.isdir(reference) else reference


def resolve_local_path(reference: str, *, role: str) -> str:
    """Map a recipe reference to a local folder, downloading from the Hub if needed.

    Args:
        reference: A local folder, or a Hub id ``org/name[@revision]``.
        role: What the model is in the recipe (``base_model``, ``task 2``), for errors.

    Returns:
        The local folder.

    Raises:
        CheckpointError: The reference does not exist, or cannot be fetched.

    """
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


def open_checkpoint(
    reference: str, *, role: str, allow_pickle: bool = False, lora: LoraCache | None = None
) -> Checkpoint:
    """Resolve a reference and check its layout and every shard header.

    Args:
        reference: A local folder or Hub id, as written in the recipe.
        role: What the model is in the recipe, for error messages.
        allow_pickle: Accept ``pytorch_model.bin`` checkpoints (unsafe: pickle).
        lora: Where to merge a ``base+adapter`` reference (required for one).

    Returns:
        The opened :class:`Checkpoint` (no tensor data read yet).

    Raises:
        CheckpointError: Naming the folder, file and tensor at fault.

    """
    if is_lora(reference):
        if lora is None:
            raise CheckpointError(f"{role} {reference!r}: a LoRA reference needs a merge cache")
        folder = lora.merged_folder(reference, role=role, allow_pickle=allow_pickle)
    else:
        folder = resolve_local_path(reference, role=role)
    is_st, shards, single = folder_layout(folder, allow_pickle)
    header = safetensors_header if is_st else pickle_header
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
