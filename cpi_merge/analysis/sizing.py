"""How many entries a core holds, and which exact selection strategy fits in memory."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from cpi_merge.analysis.select_buffer import BUFFER_BYTES_PER_CORE_ENTRY
from cpi_merge.errors import RecipeError

LOG = logging.getLogger(__name__)
Strategy = Literal["auto", "buffer", "histogram"]
STRATEGIES = ("auto", "buffer", "histogram")


def core_size(core_fraction: float, total: int) -> int:
    """K = floor(p · D), exact for p's decimal value (0.29 × 100 is 29, not 28).

    Raises:
        RecipeError: k would be 0 (p selects nothing).

    """
    k = int(Decimal(repr(core_fraction)) * total)
    if k < 1:
        raise RecipeError(
            f"parameters.core_fraction: {core_fraction} selects floor(p × D) = 0 of the "
            f"D = {total:,} entries; use core_fraction >= {1 / total:.3g}"
        )
    return k


def default_memory_budget() -> int:
    """40% of physical memory, in bytes."""
    try:
        return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy that will run, and why (recorded in the plan, shown in the summary)."""

    name: Literal["buffer", "histogram"]
    reason: str


def choose_strategy(
    strategy: Strategy, *, n_tasks: int, k: int, memory_budget: int
) -> StrategyChoice:
    """Pick ``buffer`` (one pass) unless its worst-case memory exceeds the budget.

    The buffer peaks at about 3k (Δ, |θ0|, index) entries per task: 48 bytes per core entry.
    """
    if strategy != "auto":
        return StrategyChoice(strategy, "asked for")
    need = n_tasks * k * BUFFER_BYTES_PER_CORE_ENTRY
    if need <= memory_budget:
        chosen, verb = "buffer", "fits"
    else:
        chosen, verb = "histogram", "does not fit"
    reason = (
        f"auto: the one-pass buffer needs up to {need / 1e9:.2f} GB, which {verb} the memory "
        f"budget of {memory_budget / 1e9:.2f} GB"
    )
    LOG.info("strategy %s (%s)", chosen, reason)
    return StrategyChoice(chosen, reason)
