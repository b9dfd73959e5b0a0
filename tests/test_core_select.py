"""Exact top-k selection over Δ streams, against torch.topk on the concatenation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpi_merge.analysis.radix import float32_bits, float32_from_bits
from cpi_merge.analysis.select_buffer import CutTooHighError, select_cores_buffer
from cpi_merge.analysis.select_histogram import count_cores, select_cores_histogram
from cpi_merge.analysis.selection import DeltaChunk
from cpi_merge.analysis.starting_cut import estimate_cuts
from cpi_merge.errors import DegenerateTaskError


def memory_stream(tensors, chunk):
    """tensors: list over tensors of list over tasks of 1-D float32 Δ."""

    def open_stream():
        offset = 0
        for index, per_task in enumerate(tensors):
            n = per_task[0].numel()
            for start in range(0, n, chunk):
                yield DeltaChunk(
                    index, offset + start, tuple(d[start : start + chunk] for d in per_task)
                )
            offset += n

    return open_stream


def offsets_of(tensors):
    sizes = [per_task[0].numel() for per_task in tensors]
    return list(np.cumsum([0] + sizes[:-1]))


def reference(tensors, k):
    n_tasks = len(tensors[0])
    full = [torch.cat([t[i] for t in tensors]) for i in range(n_tasks)]
    thresholds = [float(torch.topk(d, k).values[-1]) for d in full]
    masks = [d >= t for d, t in zip(full, thresholds)]
    sizes = [t[0].numel() for t in tensors]
    counts = np.array([[int(p.sum()) for p in torch.split(m, sizes)] for m in masks])
    inter = np.array([[int((a & b).sum()) for b in masks] for a in masks])
    positives = [int((d > 0).sum()) for d in full]
    return thresholds, counts, inter, positives


def run(strategy, tensors, k, chunk):
    labels = [f"task{i}" for i in range(len(tensors[0]))]
    total = sum(t[0].numel() for t in tensors)
    stream = memory_stream(tensors, chunk)
    if strategy == "buffer":
        return select_cores_buffer(
            stream(), k=k, tensor_offsets=offsets_of(tensors), labels=labels, total=total
        )
    if strategy == "buffer_cut":  # a starting cut, from below or above the threshold
        full = [torch.cat([t[i] for t in tensors]) for i in range(len(labels))]
        cuts = [float(d[(7 * k + i) % total]) for i, d in enumerate(full)]
        kw = dict(k=k, tensor_offsets=offsets_of(tensors), labels=labels, total=total)
        try:
            return select_cores_buffer(stream(), cuts=cuts, **kw)
        except CutTooHighError:  # what run_analysis does
            assert any(c > float(torch.topk(d, k).values[-1]) for c, d in zip(cuts, full))
            return select_cores_buffer(stream(), **kw)
    return select_cores_histogram(stream, k=k, n_tensors=len(tensors), labels=labels, total=total)


def check(strategy, tensors, k, chunk):
    thresholds, counts, inter, positives = reference(tensors, k)
    if min(positives) < k:
        with pytest.raises(DegenerateTaskError, match="differ from the base"):
            run(strategy, tensors, k, chunk)
        return
    got = run(strategy, tensors, k, chunk)
    assert [float32_bits(t) for t in got.thresholds] == [float32_bits(t) for t in thresholds]
    assert np.array_equal(got.counts, counts)
    assert np.array_equal(got.intersections, inter)
    if strategy.startswith("buffer"):  # the buffer also hands over every core position
        full = [torch.cat([t[i] for t in tensors]) for i in range(len(thresholds))]
        for d, t, positions in zip(full, thresholds, got.positions):
            assert positions.tolist() == (d >= t).nonzero().squeeze(1).tolist()


@st.composite
def delta_sets(draw):
    n_tasks = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=6))
    distinct = draw(st.sampled_from([2, 3, 7, 1000, 0]))  # 0: continuous values
    zero_share = draw(st.sampled_from([0.0, 0.3, 0.95]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tensors = []
    for n in sizes:
        per_task = []
        for _ in range(n_tasks):
            if distinct:
                v = rng.integers(1, distinct + 1, n).astype(np.float32) * np.float32(1e-3)
            else:
                v = np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(
                    10.0 ** rng.integers(-8, 3)
                )
            v[rng.random(n) < zero_share] = 0
            per_task.append(torch.from_numpy(v))
        tensors.append(per_task)
    total = sum(sizes)
    k = draw(st.integers(1, total))
    chunk = draw(st.integers(1, 70))
    return tensors, k, chunk


@pytest.mark.parametrize("strategy", ["buffer", "buffer_cut", "histogram"])
@settings(max_examples=150, deadline=None)
@given(case=delta_sets())
def test_matches_topk_reference(strategy, case):
    tensors, k, chunk = case
    check(strategy, tensors, k, chunk)


@pytest.mark.parametrize("strategy", ["buffer", "histogram"])
def test_ties_at_threshold_are_all_in_the_core(strategy):
    # 10 entries equal to the k-th largest: all of them belong to the core.
    d = torch.tensor([5.0, 4.0] + [3.0] * 10 + [1.0] * 8)
    got = run(strategy, [[d]], k=5, chunk=3)
    assert got.thresholds == (3.0,)
    assert got.core_counts == (12,)


@pytest.mark.parametrize("strategy", ["buffer", "histogram"])
def test_buffer_survives_heavy_ties_over_many_chunks(strategy):
    # Every entry ties: the core is everything, no matter the chunking.
    tensors = [[torch.full((97,), 0.25)] for _ in range(7)]
    got = run(strategy, tensors, k=3, chunk=5)
    assert got.thresholds == (0.25,)
    assert got.core_counts == (7 * 97,)


@pytest.mark.parametrize("strategy", ["buffer", "histogram"])
def test_too_few_changed_entries_is_degenerate(strategy):
    d = torch.zeros(100)
    d[:3] = 1.0
    with pytest.raises(DegenerateTaskError, match="only 3 of 100 entries differ"):
        run(strategy, [[d]], k=4, chunk=16)


@pytest.mark.parametrize("strategy", ["buffer", "histogram"])
def test_extreme_magnitudes(strategy):
    # subnormals and the largest finite float32 are ordered correctly
    tiny = float32_from_bits(1)
    d = torch.tensor([tiny, 3.4028234663852886e38, 1e-30, 2 * tiny, 1.0], dtype=torch.float32)
    check(strategy, [[d]], k=4, chunk=2)


def test_count_cores_reports_per_tensor_and_pairs():
    a = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])]
    b = [torch.tensor([0.0, 3.0]), torch.tensor([2.0, 3.0])]
    counts, inter = count_cores(memory_stream([a, b], 2)(), [1.0, 2.0], n_tensors=2)
    assert counts.tolist() == [[2, 1], [0, 2]]
    assert inter.tolist() == [[3, 1], [1, 2]]


def test_float32_bits_round_trip():
    for value in [0.0, 1.0, 1e-45, 3.4028234663852886e38, 0.1]:
        f32 = float(np.float32(value))
        assert float32_from_bits(float32_bits(f32)) == f32


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(0, 3.3999999521443642e38, width=32, allow_subnormal=False),
            st.sampled_from([0.0, 1.0, 0.5, 1e-45]),
        ),
        min_size=1,
        max_size=200,
    ),
    st.data(),
)
def test_kth_largest_equals_kthvalue(values, data):
    from cpi_merge.analysis.radix import kth_largest

    t = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    expected = float(torch.kthvalue(t, len(values) - k + 1).values)
    assert kth_largest(t, k) == expected


def test_estimated_cuts_let_about_headroom_times_k_through():
    rng = np.random.default_rng(0)
    full = torch.from_numpy(np.abs(rng.standard_normal(1_000_000)).astype(np.float32))
    sample = full[::50]
    k = 10_000
    (cut,) = estimate_cuts([sample], k=k, total=full.numel(), headroom=1.5)
    assert 1.3 * k < int((full >= cut).sum()) < 1.7 * k
    # too small a sample to tell, or NaN in it: no cut
    assert estimate_cuts([sample[:100]], k=k, total=full.numel()) == [0.0]
    assert estimate_cuts([torch.tensor([float("nan")] * 10_000)], k=k, total=10_000) == [0.0]
