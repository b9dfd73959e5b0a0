"""Exact top-k selection over Δ streams, against torch.topk on the concatenation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpi_merge.analysis.boundary import TensorLayout
from cpi_merge.analysis.core_rule import MAX_HASH, tie_hash
from cpi_merge.analysis.radix import float32_bits, float32_from_bits
from cpi_merge.analysis.select_buffer import CutTooHighError, select_cores_buffer
from cpi_merge.analysis.select_histogram import select_cores_histogram
from cpi_merge.analysis.selection import DeltaChunk
from cpi_merge.analysis.starting_cut import estimate_cuts
from cpi_merge.errors import DegenerateTaskError

NAMES = [f"layer.{i}.weight" for i in range(10)]


def signs_of(d):
    """A fixed pattern of update signs for a Δ tensor (its entries' parity)."""
    return torch.where(torch.arange(d.numel()) % 3 == 0, -1.0, 1.0)


def memory_stream(tensors, chunk, bases=None):
    """tensors: list over tensors of list over tasks of 1-D float32 Δ; bases: θ0 per tensor."""
    bases = bases or [torch.ones_like(per_task[0]) for per_task in tensors]

    def open_stream(_label=""):
        offset = 0
        for index, per_task in enumerate(tensors):
            n = per_task[0].numel()
            for start in range(0, n, chunk):
                part = slice(start, start + chunk)
                yield DeltaChunk(
                    index,
                    offset + start,
                    tuple(d[part] for d in per_task),
                    bases[index][part],
                    # θi: only their signs against θ0 matter here (the signs pattern)
                    tuple(
                        (bases[index] + signs_of(d) * (1 + t % 2))[part]
                        for t, d in enumerate(per_task)
                    ),
                )
            offset += n

    return open_stream


def layout_of(tensors):
    sizes = [per_task[0].numel() for per_task in tensors]
    return TensorLayout(NAMES[: len(tensors)], list(np.cumsum([0] + sizes[:-1])))


def reference(tensors, bases, k, exact_k, seed):
    """Brute force: sort every entry by its whole key and take the first k."""
    n_tasks = len(tensors[0])
    sizes = [t[0].numel() for t in tensors]
    base_abs = torch.cat(bases).abs().numpy()
    hashes = np.concatenate(
        [tie_hash(seed, NAMES[j], np.arange(n)) for j, n in enumerate(sizes)]
    ).astype(np.float64)
    masks, boundaries, ties, taken, energy, negative = [], [], [], [], [], []
    for i in range(n_tasks):
        delta = torch.cat([t[i] for t in tensors]).numpy()
        negative.append(torch.cat([signs_of(t[i]) * (1 + i % 2) < 0 for t in tensors]))
        order = np.lexsort((hashes, base_abs, -delta.astype(np.float64)))
        order = order[delta[order] > 0]
        if order.size < k:
            return None
        last = order[k - 1]
        t = delta[last]
        if exact_k:
            core = np.zeros(delta.size, dtype=bool)
            core[order[:k]] = True
            boundaries.append((t, base_abs[last], int(hashes[last])))
        else:
            core = delta >= t
            boundaries.append((t, np.inf, MAX_HASH))
        masks.append(torch.from_numpy(core))
        ties.append(int((delta == t).sum()))
        taken.append(int((core & (delta == t)).sum()))
        energy.append(float((delta.astype(np.float64)[core] ** 2).sum()))
    counts = np.array([[int(p.sum()) for p in torch.split(m, sizes)] for m in masks])
    inter = np.array([[int((a & b).sum()) for b in masks] for a in masks])
    conflicts = np.array(
        [
            [int((a & b & (na != nb)).sum()) for b, nb in zip(masks, negative)]
            for a, na in zip(masks, negative)
        ]
    )
    return boundaries, counts, inter, masks, ties, taken, energy, conflicts


def run(strategy, tensors, k, chunk, *, bases=None, exact_k=True, seed=0, budget=1 << 30):
    labels = [f"task{i}" for i in range(len(tensors[0]))]
    total = sum(t[0].numel() for t in tensors)
    stream = memory_stream(tensors, chunk, bases)
    kw = dict(
        k=k, layout=layout_of(tensors), labels=labels, total=total, exact_k=exact_k, seed=seed
    )
    if strategy == "buffer":
        return select_cores_buffer(stream(), **kw)
    if strategy == "buffer_cut":  # a starting cut, from below or above the threshold
        full = [torch.cat([t[i] for t in tensors]) for i in range(len(labels))]
        cuts = [float(d[(7 * k + i) % total]) for i, d in enumerate(full)]
        try:
            return select_cores_buffer(stream(), cuts=cuts, **kw)
        except CutTooHighError:  # what run_analysis does
            assert any(c > float(torch.topk(d, k).values[-1]) for c, d in zip(cuts, full))
            return select_cores_buffer(stream(), **kw)
    if strategy in ("histogram_tight", "histogram_sampled_tight"):  # no memory: narrow the
        budget = 0  # buckets to the whole key
    samples = None
    if strategy.startswith("histogram_sampled"):  # a sample of every third entry
        samples = [torch.cat([t[i] for t in tensors])[::3] for i in range(len(labels))]
    if strategy == "histogram_misled":  # a sample that points far from every boundary
        samples = [torch.cat([t[i] for t in tensors]) * 1e6 + 1 for i in range(len(labels))]
    return select_cores_histogram(stream, memory_budget=budget, samples=samples, **kw)


def check(strategy, tensors, k, chunk, *, bases=None, exact_k=True, seed=0):
    bases = bases or [torch.ones_like(per_task[0]) for per_task in tensors]
    ref = reference(tensors, bases, k, exact_k, seed)
    if ref is None:
        with pytest.raises(DegenerateTaskError, match="differ from the base"):
            run(strategy, tensors, k, chunk, bases=bases, exact_k=exact_k, seed=seed)
        return
    boundaries, counts, inter, masks, ties, taken, energy, conflicts = ref
    got = run(strategy, tensors, k, chunk, bases=bases, exact_k=exact_k, seed=seed)
    assert np.allclose(got.core_energy, energy, rtol=1e-6, atol=0)
    assert np.array_equal(got.sign_conflicts, conflicts)
    for b, (t, a, h) in zip(got.boundaries, boundaries):
        assert float32_bits(b.threshold) == float32_bits(float(t))
        assert b.tie_base_abs == float(np.float32(a)) and b.tie_hash == h
    assert np.array_equal(got.counts, counts)
    assert np.array_equal(got.intersections, inter)
    assert list(got.at_threshold) == ties and list(got.taken_at_threshold) == taken
    if strategy.startswith("buffer"):  # the buffer also hands over every core position
        for mask, positions in zip(masks, got.positions):
            assert positions.tolist() == mask.nonzero().squeeze(1).tolist()


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
    bases = [
        torch.from_numpy(rng.choice([-0.5, 0.25, 0.5, 1.0, 0.0], n).astype(np.float32))
        for n in sizes
    ]
    k = draw(st.integers(1, total))
    chunk = draw(st.integers(1, 70))
    return tensors, bases, k, chunk, draw(st.booleans()), draw(st.integers(0, 3))


STRATEGIES = [
    "buffer",
    "buffer_cut",
    "histogram",
    "histogram_tight",
    "histogram_sampled",
    "histogram_sampled_tight",
    "histogram_misled",
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=150, deadline=None)
@given(case=delta_sets())
def test_matches_the_full_key_reference(strategy, case):
    """Exactly k entries by (Δ, |θ0|, hash), whatever the ties, chunking or strategy."""
    tensors, bases, k, chunk, exact_k, seed = case
    check(strategy, tensors, k, chunk, bases=bases, exact_k=exact_k, seed=seed)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ties_at_the_threshold_smaller_base_first_then_hash(strategy):
    # 10 entries equal to the 5th largest: 3 of them join the core, smallest |θ0| first.
    d = torch.tensor([5.0, 4.0] + [3.0] * 10 + [1.0] * 8)
    base = torch.tensor([1.0, 1.0] + [0.5, 0.1, 0.9, 0.1, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4] + [1.0] * 8)
    got = run(strategy, [[d]], k=5, chunk=3, bases=[base])
    assert got.thresholds == (3.0,) and got.core_counts == (5,)
    assert got.at_threshold == (10,) and got.taken_at_threshold == (3,)
    assert got.boundaries[0].tie_base_abs == float(np.float32(0.2))
    if strategy.startswith("buffer"):
        assert got.positions[0].tolist() == [0, 1, 3, 5, 8]
    every = run(strategy, [[d]], k=5, chunk=3, bases=[base], exact_k=False)
    assert every.core_counts == (12,) and every.boundaries[0].takes_every_tie


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_heavy_ties_over_many_chunks(strategy):
    # Every entry ties on Δ and |θ0|: the hash alone decides, and the core is k entries.
    tensors = [[torch.full((97,), 0.25)] for _ in range(7)]
    got = run(strategy, tensors, k=3, chunk=5)
    assert got.thresholds == (0.25,) and got.core_counts == (3,)
    assert got.at_threshold == (7 * 97,) and got.taken_at_threshold == (3,)
    assert run(strategy, tensors, k=3, chunk=5, exact_k=False).core_counts == (7 * 97,)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_too_few_changed_entries_is_degenerate(strategy):
    d = torch.zeros(100)
    d[:3] = 1.0
    with pytest.raises(DegenerateTaskError, match="only 3 of 100 entries differ"):
        run(strategy, [[d]], k=4, chunk=16)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_extreme_magnitudes(strategy):
    # subnormals and the largest finite float32 are ordered correctly
    tiny = float32_from_bits(1)
    d = torch.tensor([tiny, 3.4028234663852886e38, 1e-30, 2 * tiny, 1.0], dtype=torch.float32)
    check(strategy, [[d]], k=4, chunk=2)


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


def test_a_sample_makes_heavy_ties_two_passes_in_little_memory():
    # 10,000 entries tie at Δ = 2^-12 (bf16-like), the core takes 50 of them: the budget
    # holds 2,000 kept entries, not the ties. Narrowing by Δ's digits cannot split an
    # exact tie; the sample lets the first pass narrow by |θ0| too, so the next pass is
    # the last.
    rng = np.random.default_rng(0)
    n_top, n_ties, n_low = 100, 10_000, 20_000
    d = np.concatenate(
        [np.ones(n_top), np.full(n_ties, 2.0**-12), np.full(n_low, 2.0**-14)]
    ).astype(np.float32)
    order = rng.permutation(d.size)
    delta = torch.from_numpy(d[order])
    base = torch.from_numpy(rng.uniform(0.01, 1.0, d.size).astype(np.float32))
    tensors, bases, k = [[delta]], [base], n_top + 50
    layout = TensorLayout(NAMES[:1], [0])
    stream = memory_stream(tensors, 1000, bases)
    passes = []

    def counting(label=""):
        passes.append(label)
        return stream(label)

    kw = dict(k=k, layout=layout, labels=["a"], total=d.size, memory_budget=2000 * 32)
    plain = select_cores_histogram(counting, **kw)
    assert len(passes) == 4  # Δ's upper bits, its lower bits, |θ0|'s upper bits, final
    passes.clear()
    sampled = select_cores_histogram(counting, samples=[delta[::3]], **kw)
    assert passes == ["pass 1: key histogram", "pass 2: cores and overlaps"]
    assert sampled == plain
    boundaries, counts, inter, *_ = reference(tensors, bases, k, True, 0)
    assert sampled.core_counts == (k,) and np.array_equal(sampled.counts, counts)
    assert sampled.at_threshold == (n_ties,) and sampled.taken_at_threshold == (50,)
    assert sampled.thresholds == (2.0**-12,)
