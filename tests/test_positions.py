"""Listing the entries at or above a cut: the same positions as numpy and torch."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpi_merge.analysis.positions import positions_at_least, true_positions


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 300),
    density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_true_positions_match_flatnonzero(size, density, seed):
    mask = np.random.default_rng(seed).random(size) < density
    got = true_positions(mask)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.flatnonzero(mask))


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1), rank=st.floats(0, 1))
def test_positions_at_least_match_torch(size, seed, rank):
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(size, generator=g) * 1e-3).abs().bfloat16().float()  # many ties
    values[torch.rand(size, generator=g) < 0.2] = 0.0
    cut = float(values.sort().values[int(rank * (size - 1))])
    want = (values > 0 if cut == 0 else values >= cut).nonzero().squeeze(1)
    assert torch.equal(positions_at_least(values, cut), want)


def test_a_long_sparse_chunk():
    values = torch.zeros((1 << 20) + 5)
    at = torch.tensor([0, 7, 8, 63, 64, 1000, 1 << 19, (1 << 20) + 4])
    values[at] = torch.arange(1, len(at) + 1, dtype=torch.float32)
    assert torch.equal(positions_at_least(values, 2.0), at[1:])
    assert torch.equal(positions_at_least(values, 0.0), at)
    assert torch.equal(positions_at_least(values, 100.0), torch.empty(0, dtype=torch.int64))


def test_nan_never_passes_and_a_bad_cut_is_refused():
    import pytest

    values = torch.tensor([float("nan"), 0.0, 1.0, 2.0])
    assert torch.equal(positions_at_least(values, 1.0), torch.tensor([2, 3]))
    assert torch.equal(positions_at_least(values, 0.0), torch.tensor([2, 3]))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="a cut is a"):
            positions_at_least(values, bad)
