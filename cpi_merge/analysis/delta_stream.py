"""Stream |θi − θ0| over a whole model, one tensor at a time, in bounded float32 chunks.

Only the base tensor and the task tensors of the current name are held (in their stored
dtype); the float32 work happens in reused chunk buffers, so peak memory does not grow
with the model. Every chunk is checked for NaN/Inf (a single NaN would silently drop out
of every comparison), and the update statistics (:mod:`.update_stats`) are accumulated
on the first pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from cpi_merge.analysis.selection import DeltaChunk
from cpi_merge.analysis.update_stats import UpdateStats
from cpi_merge.errors import NonFiniteError
from cpi_merge.faults import pause_point
from cpi_merge.io.checkpoints import Checkpoint, TensorInfo
from cpi_merge.io.direct_read import ReadSlot
from cpi_merge.io.vocabulary import VocabularyAlignment

DEFAULT_CHUNK_ENTRIES = 1 << 20
"""Float32 entries per scratch buffer: 4 MiB, so that a chunk stays in cache between
the steps that touch it (22% faster than 16 MiB at 0.47B, benchmarks/RESULTS.md)."""
DEFAULT_SAMPLE_ENTRIES = 1 << 22
SAMPLE_BLOCK = 4096


def _nonfinite_report(name: str, inputs: Sequence[tuple[str, torch.Tensor]]) -> NonFiniteError:
    parts = []
    for label, tensor in inputs:
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            parts.append(f"{label} has {nan:,} NaN and {inf:,} Inf entries")
    if not parts:
        return NonFiniteError(
            f"tensor {name!r}: |θi − θ0| overflows float32 (inputs near ±3.4e38); "
            "such checkpoints cannot be compared"
        )
    return NonFiniteError(
        f"tensor {name!r}: " + "; ".join(parts) + ". NaN/Inf would poison every merge; "
        "repair or drop the checkpoint (this check stops at the first such tensor)"
    )


class DeltaStream:
    """Callable that yields a fresh pass of :class:`DeltaChunk` over all tensors.

    Args:
        base: θ0.
        tasks: θ1..θN, each with the same tensors as the base.
        tensors: The tensors to stream, in order (global offsets follow this order).
        cast: The recipe's ``dtype``: inputs are cast to it first, exactly as mergekit's
            loader does, so the analysis sees the values the merge will see.
        chunk_entries: Float32 scratch size per buffer, in entries.
        progress: Show a progress bar per pass (bytes read, rate and ETA).
        vocabulary: With a tokenizer option: vocabulary tensors are compared by token
            (``tensors`` then carry the analysed shapes).

    """

    def __init__(
        self,
        base: Checkpoint,
        tasks: Sequence[Checkpoint],
        tensors: Sequence[TensorInfo],
        *,
        cast: torch.dtype | None = None,
        chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
        progress: bool = True,
        vocabulary: VocabularyAlignment | None = None,
        energy_curve: bool = False,
    ):
        self.base = base
        self.vocabulary = vocabulary
        self.tasks = list(tasks)
        self.tensors = list(tensors)
        self.cast = cast
        self.progress = progress
        self.offsets: list[int] = []
        total = 0
        for t in self.tensors:
            self.offsets.append(total)
            total += t.numel
        self.total = total
        self.chunk_entries = max(1, min(chunk_entries, max((t.numel for t in tensors), default=1)))
        self.stats = UpdateStats(len(self.tasks), energy_curve=energy_curve)
        self._bytes = [self._stored_bytes(t.name) for t in self.tensors]
        self._passes = 0
        # One read slot per model (not per checkpoint: a recipe may list one twice).
        self._slots = [ReadSlot() for _ in range(1 + len(self.tasks))]

    @property
    def total_bytes(self) -> int:
        """Bytes one pass reads from the checkpoints, as stored (for the progress bar)."""
        return sum(self._bytes)

    def _stored_bytes(self, name: str) -> int:
        size = 0
        for ckpt in (self.base, *self.tasks):
            info = ckpt.tensors.get(name)
            if info is not None:
                size += info.numel * info.dtype.itemsize
        return size

    def _load(self, ckpt: Checkpoint, name: str, slot: ReadSlot) -> torch.Tensor:
        x = ckpt.read(name, slot)  # mapped alone, dropped at the slot's next read
        if self.cast is not None and x.dtype != self.cast:
            x = x.to(self.cast)
        return x.reshape(-1)

    def _load_all(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """θ0 and every task's tensor, flat, vocabulary rows aligned by token."""
        base = self._load(self.base, name, self._slots[0])
        tasks = [self._load(t, name, s) for t, s in zip(self.tasks, self._slots[1:], strict=True)]
        vocab = self.vocabulary
        if vocab is None or name not in vocab.tensors:
            return base, tasks
        shape = self.base.tensors[name].shape
        base = vocab.align(self.base, name, base.view(shape[0], -1), None)
        tasks = [
            vocab.align(c, name, t.view(c.tensors[name].shape[0], -1), base)
            for c, t in zip(self.tasks, tasks, strict=True)
        ]
        return base.reshape(-1), [t.reshape(-1) for t in tasks]

    def sample(
        self, entries: int = DEFAULT_SAMPLE_ENTRIES, block: int = SAMPLE_BLOCK
    ) -> list[torch.Tensor]:
        """|Δ| of every task at about ``entries`` positions spread over the whole stream.

        The positions are contiguous blocks of ``block`` entries, evenly spaced in every
        tensor, as many as the tensor's share of the sample rounds to (tensors whose
        share is under half a block are left out), so only those blocks are read: a
        small fraction of a pass. When the stream holds no more than
        ``entries`` entries, the sample is all of it. Values are neither checked nor
        counted here (the pass that follows does that).

        Returns:
            One float32 tensor per task.
        """
        fraction = min(1.0, entries / max(self.total, 1))
        parts: list[list[torch.Tensor]] = [[] for _ in self.tasks]
        for info in self.tensors:
            blocks = None  # None: the whole tensor
            if fraction < 1.0:
                rows = info.numel // block
                take = round(info.numel * fraction / block)
                if rows == 0 or take == 0:
                    continue
                blocks = (rows, min(take, rows), block)
            if self.vocabulary is not None and info.name in self.vocabulary.tensors:
                base, tasks = self._load_all(info.name)  # rows by token: a small tensor
            else:  # one tensor at a time: only its sampled blocks stay
                base, tasks = self.base.get(info.name), (t.get(info.name) for t in self.tasks)
            base = self._sampled(base, blocks)
            for part, task in zip(parts, tasks, strict=True):
                part.append(self._sampled(task, blocks).sub_(base).abs_())
        return [torch.cat(p) if p else torch.empty(0) for p in parts]

    def _sampled(self, x: torch.Tensor, blocks: tuple[int, int, int] | None) -> torch.Tensor:
        """``take`` evenly spaced of a tensor's ``rows`` blocks of ``size``, cast, float32."""
        x = x.reshape(-1)
        if blocks is not None:
            rows, take, size = blocks
            picked = torch.linspace(0, rows - 1, take).round().long()  # exactly take blocks
            x = x[: rows * size].view(rows, size)[picked].reshape(-1)
        if self.cast is not None and x.dtype != self.cast:
            x = x.to(self.cast)
        return x.to(torch.float32, copy=True)  # a copy: the caller works on it in place

    def __call__(self, desc: str = "core regions") -> Iterator[DeltaChunk]:
        """Stream one pass.

        Args:
            desc: Label of the progress bar.

        Yields:
            One :class:`DeltaChunk` per chunk; its buffers are reused by the next one.

        Raises:
            NonFiniteError: An input holds NaN or Inf (names the tensor and models).

        """
        first_pass = self._passes == 0
        self._passes += 1
        n = self.chunk_entries
        base_buf = torch.empty(n, dtype=torch.float32)
        delta_bufs = [torch.empty(n, dtype=torch.float32) for _ in self.tasks]
        bar = tqdm(  # bytes of the checkpoints read so far, with rate and ETA
            total=self.total_bytes,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not self.progress,
            leave=False,
        )
        try:
            for index, (info, offset) in enumerate(zip(self.tensors, self.offsets, strict=True)):
                base, tasks = self._load_all(info.name)
                for start in range(0, info.numel, n):
                    stop = min(start + n, info.numel)
                    m = stop - start
                    b = base_buf[:m].copy_(base[start:stop])
                    raw = tuple(task[start:stop] for task in tasks)
                    signed = [
                        buf[:m].copy_(t).sub_(b) for buf, t in zip(delta_bufs, raw, strict=True)
                    ]
                    # Later passes see the same, already checked values.
                    if first_pass and not self.stats.add(b, signed):
                        raise self._nonfinite(info.name, base, tasks)
                    deltas = tuple(d.abs_() for d in signed)  # in place: while in cache
                    if first_pass:
                        self.stats.add_magnitudes(deltas)
                    yield DeltaChunk(index, offset + start, deltas, b, raw)
                    bar.update(self._bytes[index] * m // max(info.numel, 1))
                    pause_point("analysis")
                for ckpt in (self.base, *self.tasks):  # its bytes are in the page cache now
                    ckpt.mark_read(info.name)
                del base, tasks
        finally:
            bar.close()

    def _nonfinite(
        self, name: str, base: torch.Tensor, tasks: list[torch.Tensor]
    ) -> NonFiniteError:
        inputs = [(f"base_model {self.base.reference!r}", base)]
        inputs += [(f"model {c.reference!r}", t) for c, t in zip(self.tasks, tasks, strict=True)]
        return _nonfinite_report(name, inputs)
