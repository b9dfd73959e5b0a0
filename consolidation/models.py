"""Load a model folder for training and save results in the folder's own dtype.

Training runs in float32 (``bf16: true`` turns on autocast); results are written back in
the dtype the input was stored in, so frozen entries of a bf16 model round-trip exactly.
``trust_remote_code`` stays off and weights are written as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from consolidation.training.distributed import barrier, is_main_process, world_size
from consolidation.training.sharding import Sharding
from cpi_merge.errors import CheckpointError
from cpi_merge.io.lora import LoraCache, is_lora


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer, with a pad token (eos, if it had none).

    Raises:
        CheckpointError: The folder has no usable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{folder}: no usable tokenizer ({type(exc).__name__}: {exc}); the model folder "
            "needs one (cpi-merge copies the base model's)"
        ) from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_for_training(
    folder: str | Path, sharding: Sharding | None = None
) -> tuple[torch.nn.Module, torch.dtype]:
    """The causal LM in float32, and the dtype it was stored in.

    Args:
        folder: The model folder.
        sharding: Shard it over the launched processes as it loads (FSDP2, see
            :mod:`consolidation.training.sharding`); None: a whole model per process.

    Raises:
        CheckpointError: The folder does not load as a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {}
    if sharding is not None:
        from transformers.distributed import DistributedConfig

        extra["distributed_config"] = DistributedConfig(
            fsdp_size=world_size(),
            fsdp_mixed_precision=sharding.mixed_precision,
            fsdp_cpu_offload=sharding.cpu_offload,
        )
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=False, **extra
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: cannot load as a causal LM ({exc})") from None
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, torch.float32)
    return model, stored if isinstance(stored, torch.dtype) else torch.float32


def save_model(
    model: torch.nn.Module,
    tokenizer,
    folder: str | Path,
    dtype: torch.dtype,
    *,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save weights (safetensors, in ``dtype``), config and tokenizer into ``folder``.

    Without ``state``, a sharded model is gathered first: call this on every process then
    (a collective); only the main process writes.

    Args:
        model: The model (its config and class are saved too).
        tokenizer: Saved beside the weights, if not None.
        folder: The output folder.
        dtype: The dtype the weights are written in.
        state: The whole state dict, already gathered (:func:`full_state`).
    """
    state = dict(full_state(model) if state is None else state)
    if not is_main_process():
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Cast each storage once, so tied weights stay one tensor and are saved once (as the
    # input stored them: no lm_head.weight when tie_word_embeddings is true).
    cast: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        ptr = value.data_ptr()
        if ptr not in cast:
            cast[ptr] = value.detach().to(dtype)
        state[key] = cast[ptr]
    # A model sharded at load would ignore ``state`` and gather itself (a collective, in
    # float32); the state is gathered and cast already, so save it as a whole model's.
    distributed = getattr(model.config, "distributed_config", None)
    model.config.distributed_config = None
    try:
        model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    finally:
        model.config.distributed_config = distributed
    config_path = folder / "config.json"
    if config_path.exists():  # record the stored dtype, not the training one
        import json

        config = json.loads(config_path.read_text())
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict (sharded: gathered to the main process, on CPU).

    Sharded, it is a collective: every process must call it; the others get ``{}``.
    """
    from consolidation.freezing.shards import is_sharded

    if not any(is_sharded(p) for p in model.parameters()):
        return dict(model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if state:  # tied parameters (one object, two names): one tensor again, saved once
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in first and first[id(param)] in state and name in state:
                state[name] = state[first[id(param)]]
            first.setdefault(id(param), name)
    return state


@dataclass(frozen=True)
class LocalModel:
    """A config's ``model:`` on disk: weights folder, tokenizer folder, input folders."""

    weights: str
    tokenizer: str
    inputs: list[str]


def model_folders(reference: str) -> list[str]:
    """The local folders a ``model:`` reference reads (both parts of ``base+adapter``)."""
    return [p for p in reference.split("+") if Path(p).is_dir()] or [reference]


def local_model(reference: str, work: Path) -> LocalModel:
    """Where a ``model:`` reference lives; a ``base+adapter`` is merged first (rank 0 first).

    The adapter is merged by mergekit (PEFT ``merge_and_unload``) into ``work``; the
    tokenizer is the base's.

    Raises:
        CheckpointError: The adapter cannot be merged.
    """
    if not is_lora(reference):
        return LocalModel(reference, reference, [reference])
    cache = LoraCache(str(work / "lora-cache"))
    folder = None
    if is_main_process():
        folder = cache.merged_folder(reference, role="model")
    barrier()
    folder = folder or cache.merged_folder(reference, role="model")  # made by rank 0: reused
    return LocalModel(folder, reference.split("+")[0], model_folders(reference))
