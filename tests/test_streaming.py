"""Streaming: one tensor per model in memory at a time, and bounded float32 scratch."""

from __future__ import annotations

import weakref

from cpi_merge.analysis import analyze
from cpi_merge.checkpoints import Checkpoint
from cpi_merge.delta_stream import DeltaStream

from conftest import write_recipe


def test_tensors_are_read_once_per_pass_and_released(tiny_family, tmp_path, monkeypatch):
    base, tasks = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.02)
    reads, alive_peak = [], [0]
    live: list[weakref.ref] = []
    original = Checkpoint.get

    def tracking_get(self, name):
        tensor = original(self, name)
        live[:] = [r for r in live if r() is not None]
        live.append(weakref.ref(tensor))
        alive_peak[0] = max(alive_peak[0], len(live))
        reads.append((self.reference, name))
        return tensor

    monkeypatch.setattr(Checkpoint, "get", tracking_get)
    plan = analyze(recipe, progress=False, plots=False, strategy="buffer", chunk_entries=256)
    n_tensors = len(plan.tensors)
    assert len(reads) == n_tensors * 4  # base + 3 tasks, one pass
    assert len(set(reads)) == len(reads)
    # only the current tensor of each model is alive: base + 3 tasks (+1 being loaded)
    assert alive_peak[0] <= 5


def test_scratch_is_chunk_sized_not_model_sized(tiny_family, tmp_path):
    base, tasks = tiny_family
    from cpi_merge.checkpoints import open_checkpoint

    b = open_checkpoint(str(base), role="base_model")
    ts = [open_checkpoint(str(t), role="t") for t in tasks]
    stream = DeltaStream(b, ts, b.float_tensors, chunk_entries=100, progress=False)
    sizes = {d.numel() for chunk in stream() for d in chunk.deltas}
    assert max(sizes) <= 100 < stream.total
