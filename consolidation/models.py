"""Load a model folder for training and save results in the folder's own dtype.

Training runs in float32 (``bf16: true`` turns on autocast); results are written back in
the dtype the input was stored in, so frozen entries of a bf16 model round-trip exactly.
``trust_remote_code`` stays off and weights are written as safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cpi_merge.errors import CheckpointError


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


def load_for_training(folder: str | Path) -> tuple[torch.nn.Module, torch.dtype]:
    """The causal LM in float32, and the dtype it was stored in.

    Raises:
        CheckpointError: The folder does not load as a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: cannot load as a causal LM ({exc})") from None
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, torch.float32)
    return model, stored if isinstance(stored, torch.dtype) else torch.float32


def save_model(model: torch.nn.Module, tokenizer, folder: str | Path, dtype: torch.dtype) -> None:
    """Save weights (safetensors, in ``dtype``), config and tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    config_path = folder / "config.json"
    if config_path.exists():  # record the stored dtype, not the training one
        import json

        config = json.loads(config_path.read_text())
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
