"""Sums that come out the same on any machine: one thread, one order.

BLAS and torch split a reduction between threads, so a sum's last bits depend on the
thread count: the plan's statistics would change with the machine, and between two runs
of the forked analysis (:mod:`cpi_merge.analysis.forked`), which changes its thread count
midway. The analysis' sums go through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SLICE = 1 << 20


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block's torch operations on one thread (the count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sum_of_squares(x: torch.Tensor) -> float:
    """``Σ x²`` of a 1-D tensor in float64 (squares of float32 values are exact there).

    One thread, slices of 2^20 entries: the order is fixed and the float64 copy bounded.
    """
    total = 0.0
    with one_thread():
        for start in range(0, x.numel(), SLICE):
            part = x[start : start + SLICE].double()
            total += float(torch.dot(part, part))
    return total
