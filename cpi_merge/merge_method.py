"""The ``cpi`` merge method for mergekit: a thin adapter over :func:`cpi_merge.fusion.fuse_tensor`.

mergekit has no plugin discovery, so the method must be registered explicitly before a
merge runs (``cpi-merge`` does it for you)::

    from cpi_merge.merge_method import register_cpi_method
    register_cpi_method()            # refuses if another method already took the name

Per tensor, mergekit hands the method θ0 (``base_model``) and every model of ``models:``
in recipe order, already cast to the recipe's ``dtype``. Every task must carry its
``core_threshold`` (``cpi-merge`` fills them in from the analysis).
"""

from __future__ import annotations

import math

import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    MergeMethod,
    PerNonBase,
    TensorGroup,
    merge_method,
    register,
    registered_methods,
)

from cpi_merge.errors import CheckpointError, CpiError, RecipeError
from cpi_merge.fusion import fuse_tensor
from cpi_merge.known_cores import active_known_cores
from cpi_merge.recipe import DEFAULT_EPSILON, METHOD_NAME

PAPER_URL = "https://arxiv.org/abs/2508.21741"
UNSET = -1.0


@merge_method(
    name=METHOD_NAME,
    pretty_name="CPI-FT fusion (core parameter isolation + SLERP)",
    reference_url=PAPER_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def cpi_fusion(
    group: TensorGroup,
    omega: PerNonBase[float] = 0.5,
    core_threshold: PerNonBase[float] = UNSET,
    fusion_base: PerNonBase[int] = 0,
    task: PerNonBase[int] = 1,
    core_fraction: float = 0.01,
    tau: float = 0.1,
    epsilon: float = DEFAULT_EPSILON,
) -> torch.Tensor:
    """Fuse one tensor group (see :mod:`cpi_merge.fusion`).

    ``core_fraction`` and ``tau`` are accepted so that the recipe validates; they act
    in the analysis, not here.
    """
    name = group.metadata.name or "<tensor>"
    entries = group.non_base
    theta0 = group.base.tensor
    if not theta0.is_floating_point():
        return theta0
    thresholds = []
    for entry in entries:
        if task[entry.id] == 0:
            thresholds.append(None)
            continue
        t = core_threshold[entry.id]
        if not (t > 0 and math.isfinite(t)):
            raise RecipeError(
                f"tensor {name}: model {entry.id} has no core_threshold (got {t}); run "
                "cpi-merge, which computes them, or set models[].parameters.core_threshold"
            )
        thresholds.append(float(t))
    flagged = [i for i, e in enumerate(entries) if fusion_base[e.id] == 1]
    if len(flagged) > 1:
        raise RecipeError(f"fusion_base: 1 is set on {len(flagged)} models; set it on one")
    omegas = [float(omega[e.id]) for e in entries]
    if any(not 0.0 <= w <= 1.0 for w in omegas):
        raise RecipeError(f"omega must be in [0, 1]; got {omegas}")
    known = active_known_cores()
    # The kernel's scratch buffers live in CPU memory: with --cuda, the tensors mergekit
    # moved to the GPU come back for the fusion (and the result goes back to the GPU).
    device = theta0.device
    try:
        fused = fuse_tensor(
            theta0.cpu(),
            [e.tensor.cpu() for e in entries],
            thresholds=thresholds,
            omegas=omegas,
            fusion_base=flagged[0] if flagged else len(entries) - 1,
            epsilon=float(epsilon),
            core_positions=known.for_tensor(name, thresholds, theta0.numel()) if known else None,
        )
    except CheckpointError as exc:
        raise type(exc)(f"tensor {name}: {exc}; no output was written") from None
    return fused.to(device)


def register_cpi_method() -> MergeMethod:
    """Register the ``cpi`` method with mergekit (idempotent for this very method).

    Returns:
        The registered method.

    Raises:
        CpiError: Another method already uses the name ``cpi``.

    """
    for method in registered_methods():
        if method.spec.name == METHOD_NAME:
            if method is cpi_fusion:
                return method
            raise CpiError(
                f"mergekit already has a different merge method named {METHOD_NAME!r} "
                f"({type(method).__name__}); refusing to replace it"
            )
    register(cpi_fusion)
    return cpi_fusion
