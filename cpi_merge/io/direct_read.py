"""Read whole safetensors tensors straight into their own memory: no mapping is kept.

safetensors' ``safe_open`` (mergekit's loader) maps a shard and copies each tensor out
of the mapping; every page it touched stays in the process's resident set until the
shard is closed, so a pass over a whole model held up to one mapped shard per
checkpoint (at 2B parameters the analysis peaked at 9.4 GB RSS, above mergekit's merge
itself). The analysis reads each tensor once, in order: reading it with plain ``read``
calls into the tensor's memory costs the same single copy, and nothing stays mapped.

Only little-endian machines and floating-point dtypes are read here (what the analysis
reads); anything else returns None and the caller uses mergekit's loader.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import BinaryIO

import torch

from cpi_merge.errors import CheckpointError

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def read_header(file: BinaryIO) -> tuple[int, dict[str, dict]]:
    """A safetensors file's header: where its data starts, and its tensor entries.

    Args:
        file: The file, opened in binary mode (read from its start).

    Returns:
        ``(data start, {name: {"dtype", "shape", "data_offsets"}})``; offsets in the
        entries are relative to the data start.

    Raises:
        ValueError: The file does not start with a readable safetensors header.
        OSError: It cannot be read.
    """
    file.seek(0)
    length = int.from_bytes(file.read(8), "little")
    if not 0 < length <= os.fstat(file.fileno()).st_size - 8:
        raise ValueError(f"header length {length} does not fit the file")
    header = json.loads(file.read(length))
    return 8 + length, {k: v for k, v in header.items() if k != "__metadata__"}


class Scratch:
    """A reusable byte buffer for :meth:`ShardReader.read`.

    Fresh memory for every tensor costs a page fault (and the kernel zeroing the page)
    per 4 KiB: reading 0.94 GB of bf16 tensors took 4.2 s into fresh memory and 0.5 s
    into a reused buffer on the benchmark machine (while other jobs ran: the ratio is the
    point, not the times). A tensor read into a scratch buffer
    is valid until the next read into the same buffer.
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the buffer (grown to fit; the old contents are lost)."""
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free before allocating
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]


class ShardReader:
    """One safetensors file, open for reading tensors by name.

    Args:
        path: The ``.safetensors`` file (its header was checked when it was opened).

    Raises:
        CheckpointError: The file cannot be opened or its header read.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be opened ({exc.strerror})") from None
        try:
            self._data_start, self._entries = read_header(self._file)
        except (ValueError, OSError) as exc:
            self.close()
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None

    def read(self, name: str, scratch: Scratch | None = None) -> torch.Tensor | None:
        """The tensor ``name``; None when its dtype is not handled here.

        Args:
            name: Tensor name.
            scratch: Read into this buffer (the tensor is valid until its next use)
                instead of fresh memory.

        Raises:
            CheckpointError: The tensor is not in this file, its byte range does not
                match its shape, or the file ends before the tensor does (changed since
                it was checked).
        """
        if sys.byteorder != "little":
            return None
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this file's header")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        shape = tuple(entry["shape"])
        start, stop = entry["data_offsets"]
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if stop - start != nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} spans {stop - start:,} bytes, but its shape "
                f"{list(shape)} and dtype {entry['dtype']} need {nbytes:,}"
            )
        if scratch is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        else:
            raw = scratch.take(nbytes)
        if nbytes:
            view = memoryview(raw.numpy())
            self._file.seek(self._data_start + start)
            got = 0
            while got < nbytes:
                n = self._file.readinto(view[got:])
                if not n:
                    raise CheckpointError(
                        f"{self.path}: the file ends inside tensor {name!r} ({got:,} of "
                        f"{nbytes:,} bytes read): it is shorter than its header says "
                        "(truncated or replaced since it was checked?)"
                    )
                got += n
        return raw.view(dtype).view(shape)

    def close(self) -> None:
        """Close the file."""
        self._file.close()
