"""The fusion maths on one tensor, against an independent numpy float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpi_merge.analysis.core_rule import MAX_HASH, CoreBoundary, as_boundaries
from cpi_merge.analysis.known_cores import KnownCores
from cpi_merge.fusion.claims import core_owner
from cpi_merge.fusion.kernel import fuse_tensor

from helpers.references import ref_core, ref_fuse, ref_slerp

EPS = math.acos(0.9995)


def check(theta0, models, thresholds, omegas, fb, dtype, name=""):
    before = [theta0.clone()] + [m.clone() for m in models]
    kw = dict(boundaries=thresholds, omegas=omegas, fusion_base=fb, epsilon=EPS, name=name)
    got = fuse_tensor(theta0, models, **kw)
    owner, ref = ref_fuse(theta0, models, thresholds, omegas, fb, EPS, name=name)
    assert got.dtype == models[fb].dtype and got.shape == theta0.shape
    assert torch.equal(
        core_owner(theta0, models, thresholds, name=name),
        torch.from_numpy(owner).to(torch.int16),
    )
    core = torch.from_numpy(owner >= 0)
    for i, m in enumerate(models):  # core entries: bit-exact copies of their task
        mine = torch.from_numpy(owner == i)
        assert torch.equal(
            got[mine].view(torch.int16 if m.element_size() == 2 else torch.int32),
            m[mine].view(torch.int16 if m.element_size() == 2 else torch.int32),
        )
    rest = ~core
    eps = torch.finfo(dtype).eps
    r = torch.from_numpy(ref)[rest]
    rms = float(r.pow(2).mean().sqrt()) if r.numel() else 0.0
    diff = (got[rest].double() - r).abs()
    assert torch.all(diff <= 4 * eps * (r.abs() + rms) + 1e-30), float(diff.max())
    assert torch.isfinite(got.float()).all()
    known = fuse_tensor(
        theta0, models, **kw, core_positions=core_positions(theta0, models, thresholds, name)
    )
    assert torch.equal(known, got)  # cores handed over by an analysis: the same result
    for a, b in zip(before, [theta0, *models]):  # inputs are borrowed, never modified
        assert torch.equal(a, b)


def core_positions(theta0, models, boundaries, name=""):
    """Each task's own core (before tasks compete), as an analysis hands it over."""
    return [
        None if b is None else torch.tensor(ref_core(theta0, m, b, name), dtype=torch.int64)
        for m, b in zip(models, boundaries)
    ]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    shape = draw(st.sampled_from([(7,), (3, 5), (2, 3, 4), (1,)]))
    n_models = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=g).to(dtype)
    models = []
    for _ in range(n_models):
        step = draw(st.sampled_from([0.01, 0.3]))
        m = (theta0.float() + step * torch.randn(shape, generator=g)).to(dtype)
        if draw(st.booleans()):  # force ties between tasks
            m = models[0].clone() if models else m
        models.append(m)
    thresholds = []
    for m in models:
        if draw(st.integers(0, 4)) == 0:
            thresholds.append(None)  # not a task
        else:
            d = (m.float() - theta0.float()).abs().reshape(-1)
            pos = d[d > 0]
            t = float(pos[draw(st.integers(0, len(pos) - 1))]) if len(pos) else 1.0
            if draw(st.booleans()):  # an exact-k boundary: the tie rule decides at t
                a = float(theta0.float().abs().reshape(-1)[draw(st.integers(0, d.numel() - 1))])
                h = draw(st.integers(0, MAX_HASH))
                t = CoreBoundary(t, a, h, seed=draw(st.integers(0, 9)))
            thresholds.append(t)
    omegas = [draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])) for _ in models]
    fb = draw(st.integers(0, n_models - 1))
    name = draw(st.sampled_from(["", "model.layers.0.mlp.up_proj.weight"]))
    return theta0, models, thresholds, omegas, fb, dtype, name


@settings(max_examples=120, deadline=None)
@given(cases())
def test_fusion_matches_reference(case):
    check(*case)


def test_largest_delta_wins_ties_to_first():
    theta0 = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 3.0, 0.0])
    b = torch.tensor([-2.0, 2.0, 1.0, 0.5])
    owner = core_owner(theta0, [a, b], [1.0, 0.5])
    assert owner.tolist() == [1, 0, 0, 1]
    out = fuse_tensor(
        theta0, [a, b], boundaries=[1.0, 0.5], omegas=[0.5, 0.5], fusion_base=1, epsilon=EPS
    )
    assert out.tolist() == [-2.0, 2.0, 3.0, 0.5]


def slerp(x, y, w):
    """Fold y into x with no core entries: fuse_tensor reduced to one SLERP."""
    return fuse_tensor(
        torch.zeros_like(x),
        [y, x],
        boundaries=[None, None],
        omegas=[w, 0.0],
        fusion_base=1,
        epsilon=EPS,
    )


@pytest.mark.parametrize(
    "x, y",
    [
        ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]),  # zero norm
        ([0.0, 0.0], [0.0, 0.0]),  # both zero
        ([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]),  # anti-parallel
        ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]),  # colinear
        ([1e-30, 0.0], [0.0, 1e-30]),  # tiny but orthogonal: a real SLERP
    ],
)
def test_slerp_degenerate_cases_are_finite_and_match_reference(x, y):
    x, y = torch.tensor(x), torch.tensor(y)
    for w in (0.0, 0.3, 1.0):
        got = slerp(x, y, w)
        assert torch.isfinite(got).all()
        ref = ref_slerp(x.double().numpy(), y.double().numpy(), w, EPS)
        assert np.allclose(got.double().numpy(), ref, rtol=1e-6, atol=0), (got, ref)


def test_slerp_endpoints_and_norm():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(x, y, 0.0), x)
    assert torch.allclose(slerp(x, y, 1.0), y)
    assert torch.allclose(slerp(x, y, 0.5), torch.tensor([0.5**0.5, 0.5**0.5]))


def test_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(1000, generator=g)
    models = [theta0 + 0.1 * torch.randn(1000, generator=g) for _ in range(3)]
    kw = dict(boundaries=[0.2, None, 0.15], omegas=[0.5, 0.4, 0.5], fusion_base=2, epsilon=EPS)
    whole = fuse_tensor(theta0, models, **kw)
    chunked = fuse_tensor(theta0, models, chunk_entries=7, **kw)
    assert torch.allclose(whole, chunked, rtol=1e-6, atol=1e-7)
    core = core_owner(theta0, models, [0.2, None, 0.15]) >= 0
    assert torch.equal(whole[core], chunked[core])
    known = core_positions(theta0, models, [0.2, None, 0.15])
    for chunk in (7, 1000):  # cores handed over, split across chunks: the same result
        given = fuse_tensor(theta0, models, chunk_entries=chunk, core_positions=known, **kw)
        assert torch.equal(given, fuse_tensor(theta0, models, chunk_entries=chunk, **kw))


def test_every_entry_core_leaves_nothing_to_fold():
    theta0 = torch.zeros(3)
    a = torch.tensor([1.0, 1.0, 1.0])
    out = fuse_tensor(
        theta0,
        [a, torch.zeros(3) + 0.5],
        boundaries=[0.5, None],
        omegas=[0.5, 0.5],
        fusion_base=1,
        epsilon=EPS,
    )
    assert out.tolist() == [1.0, 1.0, 1.0]


def test_known_cores_that_do_not_match_the_values_are_not_used():
    """Values that differ from the analysed ones (e.g. rows rearranged by mergekit)."""
    theta0 = torch.zeros(6)
    a = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    kw = dict(boundaries=[1.0, None], omegas=[0.5, 0.5], fusion_base=1, epsilon=EPS)
    b = torch.tensor([0.5, 0.1, 0.2, 0.3, 0.4, 0.5])
    own = fuse_tensor(theta0, [a, b], **kw)
    assert own[3] == 2.0 and own[4] != 0.0
    for chunk in (2, 6):  # the stale position in a later chunk, or in the only one
        kw["chunk_entries"] = chunk
        ok = fuse_tensor(theta0, [a, b], core_positions=[torch.tensor([0, 3]), None], **kw)
        stale = fuse_tensor(theta0, [a, b], core_positions=[torch.tensor([0, 4]), None], **kw)
        beyond = fuse_tensor(theta0, [a, b], core_positions=[torch.tensor([0, 9]), None], **kw)
        assert torch.equal(beyond, own)  # a position past the tensor: not these values
        assert torch.equal(ok, own) and torch.equal(stale, own)


def test_thresholds_compare_in_float32():
    """A hand-written t = 0.01 is float32(0.01) = 0.0099999998 for a float32 Δ."""
    t32 = float(np.float32(0.01))
    assert t32 < 0.01
    theta0 = torch.zeros(4)
    a = torch.tensor([t32, 0.0, 0.005, 0.02])
    kw = dict(boundaries=[0.01, None], omegas=[0.5, 0.5], fusion_base=1, epsilon=EPS)
    assert core_owner(theta0, [a, a], [0.01, None]).tolist() == [0, -1, -1, 0]
    for chunk in (1, 4):  # whole and chunk by chunk (a maximum test per chunk)
        out = fuse_tensor(theta0, [a, torch.zeros(4)], chunk_entries=chunk, **kw)
        assert out[0] == a[0] and out[3] == a[3]


@pytest.mark.parametrize("known", [False, True])
def test_empty_tensor(known):
    e = torch.empty(0, 16)
    out = fuse_tensor(
        e,
        [e, e],
        boundaries=[0.5, None],
        omegas=[0.5, 0.5],
        fusion_base=1,
        epsilon=EPS,
        core_positions=[torch.empty(0, dtype=torch.int64), None] if known else None,
    )
    assert out.shape == (0, 16)


def test_known_cores_split_by_tensor_and_only_apply_to_the_same_thresholds():
    rng = np.random.default_rng(0)
    sizes = [("a", 5), ("b", 1), ("c", 9)]
    total = sum(n for _, n in sizes)
    cores = [np.sort(rng.choice(total, 6, replace=False)), np.array([0, 5, 14])]
    known = KnownCores.from_global([CoreBoundary(0.5), CoreBoundary(0.25)], cores, sizes)
    start = 0
    for name, n in sizes:
        got = known.for_tensor(name, as_boundaries([0.5, None, 0.25]), n)
        assert got[1] is None
        for want, have in zip(cores, [got[0], got[2]]):
            mine = want[(want >= start) & (want < start + n)] - start
            assert have.dtype == torch.int64 and have.tolist() == mine.tolist()
        start += n
    assert known.for_tensor("a", as_boundaries([0.5, 0.26]), 5) is None  # other thresholds
    assert known.for_tensor("a", as_boundaries([0.5]), 5) is None  # other tasks
    assert known.for_tensor("a", as_boundaries([0.5, 0.25]), 6) is None  # other size
    assert known.for_tensor("lm_head.weight", as_boundaries([0.5, 0.25]), 5) is None  # not analysed
