"""Streaming: one tensor per model in memory at a time, and bounded float32 scratch."""

from __future__ import annotations

import weakref

import torch

from cpi_merge.analysis.delta_stream import DeltaStream
from cpi_merge.commands import analyze
from cpi_merge.io.checkpoints import Checkpoint

from helpers.files import write_recipe


def test_tensors_are_read_once_per_pass_and_released(tiny_family, tmp_path, monkeypatch):
    base, tasks = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.02)
    reads, alive_peak = [], [0]
    live: list[weakref.ref] = []

    def tracking(original):
        def tracked(self, name, *args):
            tensor = original(self, name, *args)
            live[:] = [r for r in live if r() is not None]
            live.append(weakref.ref(tensor))
            alive_peak[0] = max(alive_peak[0], len(live))
            reads.append((self.reference, name))
            return tensor

        return tracked

    # the pass reads whole tensors (Checkpoint.read), the sample only blocks (.get)
    monkeypatch.setattr(Checkpoint, "read", tracking(Checkpoint.read))
    monkeypatch.setattr(Checkpoint, "get", tracking(Checkpoint.get))
    sampled = []
    real_sample = DeltaStream.sample

    def tracking_sample(self, *a, **k):
        out = real_sample(self, *a, **k)
        sampled.extend(reads)
        reads.clear()
        return out

    monkeypatch.setattr(DeltaStream, "sample", tracking_sample)
    plan = analyze(recipe, progress=False, plots=False, strategy="buffer", chunk_entries=256)
    n_tensors = len(plan.tensors)
    assert len(reads) == n_tensors * 4  # base + 3 tasks, one pass, no fallback to .get
    assert len(set(reads)) == len(reads)
    # the starting cuts' sample: the whole (tiny) stream here, each tensor read once
    assert sorted(sampled) == sorted(reads)
    # only the current tensor of each model is alive: base + 3 tasks (+1 being loaded)
    assert alive_peak[0] <= 5


def test_scratch_is_chunk_sized_not_model_sized(tiny_family, tmp_path):
    base, tasks = tiny_family
    from cpi_merge.io.checkpoints import open_checkpoint

    b = open_checkpoint(str(base), role="base_model")
    ts = [open_checkpoint(str(t), role="t") for t in tasks]
    stream = DeltaStream(b, ts, b.float_tensors, chunk_entries=100, progress=False)
    sizes = {d.numel() for chunk in stream() for d in chunk.deltas}
    assert max(sizes) <= 100 < stream.total


def test_sample_reads_evenly_spread_whole_blocks(tiny_family):
    from cpi_merge.io.checkpoints import open_checkpoint

    base, tasks = tiny_family
    b = open_checkpoint(str(base), role="base_model")
    ts = [open_checkpoint(str(t), role="t") for t in tasks]
    stream = DeltaStream(b, ts, b.float_tensors, progress=False)
    everything = stream.sample(entries=stream.total)
    chunks = [[d.clone() for d in c.deltas] for c in stream()]  # chunks reuse buffers
    full = [torch.cat([c[i] for c in chunks]) for i in range(len(ts))]
    assert all(torch.equal(s, f) for s, f in zip(everything, full))  # same values, same order
    block = 16
    part = stream.sample(entries=stream.total // 8, block=block)
    assert all(s.numel() % block == 0 for s in part)
    assert stream.total // 16 < part[0].numel() <= stream.total // 4
    for s, f in zip(part, full):  # every sampled block is a block of the stream
        windows = f.unfold(0, block, 1)
        for b in s.split(block):
            assert (windows == b).all(1).any()
