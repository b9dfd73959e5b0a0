"""Jaccard, connected components and stage order against direct definitions."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpi_merge.analysis.grouping import group_tasks, jaccard_matrix, order_stages


@settings(max_examples=100, deadline=None)
@given(st.lists(st.frozensets(st.integers(0, 30)), min_size=1, max_size=6))
def test_jaccard_from_counts_equals_set_definition(sets):
    inter = np.array([[len(a & b) for b in sets] for a in sets])
    got = jaccard_matrix(inter)
    for i, j in itertools.product(range(len(sets)), repeat=2):
        union = len(sets[i] | sets[j])
        expected = len(sets[i] & sets[j]) / union if union else 0.0
        assert got[i, j] == expected


def _reachable(jac, tau):
    n = len(jac)
    adj = {
        i: {j for j in range(n) if j != i and jac[i][j] >= tau and jac[i][j] > 0} for i in range(n)
    }
    comps, seen = [], set()
    for i in range(n):
        if i in seen:
            continue
        stack, comp = [i], set()
        while stack:
            x = stack.pop()
            if x not in comp:
                comp.add(x)
                stack.extend(adj[x] - comp)
        seen |= comp
        comps.append(sorted(comp))
    return comps


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 7).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.floats(0, 1), min_size=n * n, max_size=n * n),
            st.sampled_from([0.0, 0.1, 0.3, 1.0]),
        )
    )
)
def test_groups_are_connected_components(case):
    n, values, tau = case
    m = np.array(values).reshape(n, n)
    jac = (m + m.T) / 2
    np.fill_diagonal(jac, 1.0)
    assert group_tasks(jac, tau) == _reachable(jac, tau)


def test_tau_zero_joins_only_overlapping_pairs():
    jac = np.array([[1, 0.01, 0], [0.01, 1, 0], [0, 0, 1]])
    assert group_tasks(jac, 0.0) == [[0, 1], [2]]
    assert group_tasks(jac, 0.1) == [[0], [1], [2]]


def test_chains_are_transitive():
    jac = np.array([[1, 0.2, 0], [0.2, 1, 0.2], [0, 0.2, 1]])
    assert group_tasks(jac, 0.1) == [[0, 1, 2]]


def test_stage_order():
    groups = [[0], [1, 2], [3], [4]]
    assert order_stages(groups, "given", 0) == groups
    a = order_stages(groups, "random", 7)
    assert a == order_stages(groups, "random", 7)
    assert sorted(a) == sorted(groups)
    assert {str(order_stages(groups, "random", s)) for s in range(20)} != {str(a)}
