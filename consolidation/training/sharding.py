"""Whether to shard the model (FSDP2), as the user asked for it, and how.

Users ask for sharded training the two ways they know:

* ``torchrun`` with the Trainer's own keys in the config: ``training.fsdp`` (e.g.
  ``full_shard auto_wrap``) and ``training.fsdp_config`` (``version: 2``);
* ``accelerate launch`` with an accelerate FSDP config (``fsdp_version: 2``), which
  reaches the processes as ``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION`` variables.

Either way the model is sharded *when it is loaded*, by transformers
(``from_pretrained(distributed_config=DistributedConfig(fsdp_size=W))``: FSDP2,
``fully_shard`` on each decoder layer and the root), and the Trainer is told not to wrap
it again. That is the one FSDP2 path that (a) works on CPU as well as GPU (accelerate
1.15 silently turns an FSDP config into plain DDP on CPU) and (b) lets the Trainer run
the optimizer this tool builds and hooks (the Trainer's own FSDP path refuses a given
optimizer and builds its own before sharding). DeepSpeed is refused: its ZeRO-3 keeps
parameters as flat partitions, where exact partial freezing is not implemented, and a
run that trained without freezing would be worse than no run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cpi_merge.errors import ConfigError

LOG = logging.getLogger(__name__)
FSDP_KEYS = ("fsdp", "fsdp_config")
"""TrainingArguments fields this tool reads instead of handing them to the Trainer."""
_FSDP_OPTIONS = {"full_shard", "auto_wrap", "offload"}
_HONOURED_CONFIG = {"version", "fsdp_version", "offload_params", "cpu_offload"}
_HONOURED_VARIABLES = {"FSDP_VERSION", "FSDP_OFFLOAD_PARAMS"}
_TRUE = {"1", "true", "yes"}


@dataclass(frozen=True)
class Sharding:
    """How to shard the model (FSDP2 over every launched process).

    Attributes:
        requested_by: What asked for it (for messages).
        mixed_precision: bf16 compute with fp32 master weights and fp32 gradient
            reduction (``MixedPrecisionPolicy(bf16, fp32)``), from ``bf16: true`` or
            accelerate's ``mixed_precision: bf16``.
        cpu_offload: Keep the sharded parameters and optimizer state in CPU memory.
    """

    requested_by: str
    mixed_precision: bool
    cpu_offload: bool


def requested_sharding(arguments: dict[str, Any]) -> Sharding | None:
    """The sharding asked for by a config's ``training:`` and the launcher; None if none.

    Args:
        arguments: The config's TrainingArguments fields (``TrainingConfig.arguments``).

    Raises:
        ConfigError: DeepSpeed, FSDP version 1, or FSDP options this tool cannot honour.
    """
    env = os.environ
    if arguments.get("deepspeed") or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        source = "training.deepspeed" if arguments.get("deepspeed") else "accelerate launch"
        raise ConfigError(
            f"DeepSpeed ({source}) is not supported: exact freezing is not implemented for "
            "ZeRO's flat parameter partitions, and training without it would silently undo "
            "the isolation. Use FSDP2, the supported sharded path: training.fsdp: "
            "'full_shard auto_wrap' with training.fsdp_config: {version: 2} under torchrun, "
            "or accelerate launch with an FSDP config (fsdp_version: 2)"
        )
    fsdp = arguments.get("fsdp")
    found = None
    if fsdp:
        found = _from_training_keys(fsdp, arguments.get("fsdp_config") or {}, arguments)
    elif arguments.get("fsdp_config"):
        raise ConfigError("training.fsdp_config is set but training.fsdp is not: set both")
    elif env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        found = _from_accelerate(env, arguments)
    if found is not None and int(env.get("WORLD_SIZE", "1")) == 1:
        LOG.warning(
            "%s asks for FSDP, but this is a single process: nothing to shard, the whole "
            "model is trained here (start several with torchrun --nproc_per_node N)",
            found.requested_by,
        )
        return None
    return found


def _from_training_keys(fsdp: Any, config: Any, arguments: dict[str, Any]) -> Sharding:
    if not isinstance(config, dict):
        raise ConfigError(f"training.fsdp_config must be a mapping, received {config!r}")
    options = set(fsdp.split()) if isinstance(fsdp, str) else {"full_shard"} if fsdp else set()
    if isinstance(fsdp, list):
        options = set(fsdp)
    unknown = options - _FSDP_OPTIONS
    if unknown:
        raise ConfigError(
            f"training.fsdp: {sorted(unknown)} cannot be honoured with exact freezing; allowed: "
            f"{sorted(_FSDP_OPTIONS)} (FSDP2 full sharding of every decoder layer)"
        )
    version = config.get("version", config.get("fsdp_version", 1))
    if str(version) != "2":
        raise ConfigError(
            f"training.fsdp_config.version is {version}: only FSDP2 (version: 2, per-parameter "
            "sharding) is supported; FSDP1's flat parameters cannot be frozen entry by entry"
        )
    ignored = sorted(set(config) - _HONOURED_CONFIG)
    if ignored:
        LOG.warning(
            "training.fsdp_config keys %s are decided by transformers' FSDP2 plan (every decoder "
            "layer and the root are sharded) and are ignored%s",
            ignored,
            "; for activation checkpointing set training.gradient_checkpointing: true"
            if "activation_checkpointing" in ignored
            else "",
        )
    offload = "offload" in options or bool(config.get("offload_params", config.get("cpu_offload")))
    return Sharding("training.fsdp", _bf16(arguments), offload)


def _from_accelerate(env: os._Environ, arguments: dict[str, Any]) -> Sharding:
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate launch asks for FSDP version {version}: only FSDP2 (fsdp_version: 2 in "
            "the accelerate config) is supported; FSDP1's flat parameters cannot be frozen "
            "entry by entry"
        )
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", "bf16"):
        raise ConfigError(
            f"accelerate launch asks for mixed_precision {precision}: FSDP2 here supports bf16 "
            "(bf16 compute, fp32 master weights) or no"
        )
    offload = env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE
    ignored = sorted(k for k in env if k.startswith("FSDP_") and k not in _HONOURED_VARIABLES)
    if ignored:
        LOG.warning(
            "accelerate FSDP settings %s are decided by transformers' FSDP2 plan (every "
            "decoder layer and the root are sharded) and are ignored%s",
            ignored,
            "; for activation checkpointing set training.gradient_checkpointing: true"
            if "FSDP_ACTIVATION_CHECKPOINTING" in ignored
            else "",
        )
    return Sharding("accelerate launch", precision == "bf16" or _bf16(arguments), offload)


def _bf16(arguments: dict[str, Any]) -> bool:
    if arguments.get("fp16"):
        raise ConfigError(
            "training.fp16 with FSDP: use bf16 (FSDP2 mixed precision here is bf16 compute "
            "with fp32 master weights and fp32 gradient reduction)"
        )
    return bool(arguments.get("bf16"))


def unsharded_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The TrainingArguments fields without the FSDP keys (the model is sharded already)."""
    return {k: v for k, v in arguments.items() if k not in FSDP_KEYS}


@contextmanager
def accelerate_kept_from_wrapping() -> Iterator[None]:
    """While a stage trains, tell accelerate not to treat the sharded model as its own FSDP.

    ``accelerate launch`` passes its FSDP config as environment variables, which the
    Trainer's ``Accelerator`` reads when it is built (on GPU it would shard the model a
    second time) and again while training (FSDP1-style gradient clipping). The variable
    is restored afterwards, so a later run in the same process still sees what the
    launcher asked for.
    """
    before = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = before
