"""The one definition of core membership, used by the analysis, the fusion and consolidation.

Every entry j of the analysed tensors has, for task i, a key that orders it::

    ( Δi[j] = |θi[j] − θ0[j]|  larger first,
      |θ0[j]|                  smaller first  (the larger relative change Δ/|θ0| first),
      tie_hash(seed, tensor name, position in the tensor)  smaller first )

all in float32 from the values the merge sees (after the recipe's ``dtype`` cast). The
core ``Ci`` is the k entries with the best keys (k = floor(p · D)). It is described by the
key of its k-th entry, a :class:`CoreBoundary` ``(t, a, h)``: entry j is in the core when
its key is at least as good::

    Δ > t,  or  Δ == t and ( |θ0| < a,  or  |θ0| == a and hash <= h )

So the core holds exactly k entries (only entries whose whole key equals the boundary's,
a 53-bit hash collision, could add one more; the plan would show it). Real bf16
fine-tunes put millions of entries at the threshold t, so the tie rule decides a lot: it
prefers the entries that moved furthest relative to their own size (for a fixed Δ, one
bf16 step of a small weight), then spreads the rest evenly by a seeded hash. With
``exact_k: 0`` the boundary is ``(t, +inf, MAX_HASH)``: every entry at t is in the core,
as cpi-merge 0.1 did. The three numbers are all a recipe needs to reproduce a core in
any tensor, so the merge method and consolidation recompute the same set.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpi_merge.config.recipe import TIE_HASH_LIMIT

HASH_BITS = 53
MAX_HASH = TIE_HASH_LIMIT - 1
"""Hashes are 53-bit integers, so a recipe (a float64 number) carries one exactly."""
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class CoreBoundary:
    """The key of a core's k-th entry: ``(t, a, h)`` (see the module docstring).

    Attributes:
        threshold: ``t``, the k-th largest Δ (a float32 value).
        tie_base_abs: ``a``: entries at ``t`` with ``|θ0| < a`` are in; ``+inf``: every one.
        tie_hash: ``h``: entries at ``(t, a)`` with ``hash <= h`` are in.
        seed: Seed of the hash.
    """

    threshold: float
    tie_base_abs: float = math.inf
    tie_hash: int = MAX_HASH
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", as_float32(self.threshold))
        object.__setattr__(self, "tie_base_abs", as_float32(self.tie_base_abs))
        object.__setattr__(self, "tie_hash", int(self.tie_hash))

    @property
    def takes_every_tie(self) -> bool:
        """Whether every entry with Δ == t is in the core (no tie rule applies)."""
        return self.tie_base_abs == math.inf


def as_float32(value: float) -> float:
    """Δ is float32, so ``Δ >= t`` means ``Δ >= float32(t)``: round a threshold once.

    (The analysis's thresholds already are float32 values; a hand-written 0.01 is not.)
    """
    return float(np.float32(value))


def tie_hash(seed: int, name: str, positions: np.ndarray | torch.Tensor) -> np.ndarray:
    """The seeded 53-bit hash of entries of one tensor (a bijection of the position, mixed).

    Args:
        seed: The recipe's ``tie_seed``.
        name: Tensor name as stored.
        positions: Flat positions inside the tensor.

    Returns:
        uint64 array of hashes in ``[0, 2**53)``.
    """
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    key = np.uint64(int.from_bytes(digest[:8], "little"))
    if isinstance(positions, torch.Tensor):
        positions = positions.numpy()
    with np.errstate(over="ignore"):
        x = positions.astype(np.uint64) + key  # splitmix64's finaliser: a bijection
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
    return x >> np.uint64(64 - HASH_BITS)


def core_mask(
    delta: torch.Tensor,
    boundary: CoreBoundary,
    *,
    base: torch.Tensor | None = None,
    name: str = "",
    start: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which entries of a float32 Δ chunk are in the core.

    Args:
        delta: ``|θi − θ0|`` in float32, a contiguous run of one tensor.
        boundary: The core's boundary.
        base: θ0 at the same entries (float32); needed only where Δ == t and the
            boundary does not take every tie.
        name: The tensor's name (for the hash).
        start: Position in the tensor of the chunk's first entry (for the hash).
        out: Optional bool buffer of ``delta``'s size.

    Returns:
        A bool tensor shaped like ``delta``.
    """
    t = boundary.threshold
    mask = torch.ge(delta, t, out=out) if out is not None else delta >= t
    if boundary.takes_every_tie:
        return mask
    tied = (delta == t).nonzero().squeeze(1)
    if tied.numel():
        if base is None:
            raise ValueError("core_mask: entries tie at the threshold; θ0 is needed")
        mask[tied[~_tie_taken(boundary, base[tied].abs(), name, tied + start)]] = False
    return mask


def core_mask_at(
    delta: torch.Tensor,
    boundary: CoreBoundary,
    *,
    base: torch.Tensor,
    name: str,
    positions: torch.Tensor,
) -> torch.Tensor:
    """:func:`core_mask` for scattered entries of one tensor, at explicit ``positions``."""
    mask = delta >= boundary.threshold
    if not boundary.takes_every_tie:
        tied = (delta == boundary.threshold).nonzero().squeeze(1)
        if tied.numel():
            taken = _tie_taken(boundary, base[tied].abs(), name, positions[tied])
            mask[tied[~taken]] = False
    return mask


def _tie_taken(
    boundary: CoreBoundary, base_abs: torch.Tensor, name: str, positions: torch.Tensor
) -> torch.Tensor:
    """Among entries at Δ == t: which the tie rule takes."""
    a = boundary.tie_base_abs
    taken = base_abs < a
    level = (base_abs == a).nonzero().squeeze(1)
    if level.numel():
        hashes = tie_hash(boundary.seed, name, positions[level])
        taken[level] = torch.from_numpy(hashes <= np.uint64(boundary.tie_hash))
    return taken


def may_hold_core(largest_delta: float, boundary: CoreBoundary) -> bool:
    """Whether a chunk whose largest Δ is ``largest_delta`` can hold any core entry."""
    return largest_delta >= boundary.threshold


def as_boundaries(rules: Sequence[CoreBoundary | float | None]) -> list[CoreBoundary | None]:
    """Boundaries from boundaries or bare thresholds (``t`` means every entry with Δ >= t).

    ``None`` (a model that is not a task) stays None.
    """
    return [r if r is None or isinstance(r, CoreBoundary) else CoreBoundary(r) for r in rules]


def same_boundary(a: CoreBoundary, b: CoreBoundary) -> bool:
    """Whether two boundaries are bit for bit the same rule."""
    bits = np.array([a.threshold, a.tie_base_abs, b.threshold, b.tie_base_abs], np.float32)
    x = bits.view(np.uint32)
    return bool(x[0] == x[2] and x[1] == x[3]) and (a.tie_hash, a.seed) == (b.tie_hash, b.seed)
