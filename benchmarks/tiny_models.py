"""The one tiny-model factory for tests, the demo and the benchmarks (not part of the wheel).

Nothing is downloaded: models are built from a config (:func:`tiny_config`, for the
architectures the tests cover), the tokenizer from an alphabet with the ``tokenizers``
library (a BPE with no merges is a character tokenizer). Synthetic checkpoint families of
any size, written without building a model, are :mod:`benchmarks.synthetic`.
"""

from __future__ import annotations

import string

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DEFAULT_ALPHABET = string.ascii_lowercase + string.digits + " :=+-|>,.?"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A fast character-level tokenizer (``PreTrainedTokenizerFast``) over ``alphabet``."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    # Like Llama's tokenizer: text tokenized with special tokens starts with BOS.
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_config(
    arch: str = "llama",
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    tied: bool = False,
    max_positions: int = 128,
    **extra,
):
    """A transformers config of a tiny decoder: ``llama``, ``mistral``, ``qwen2`` or ``gpt2``.

    Args:
        arch: Architecture.
        vocab: Vocabulary size.
        hidden: Hidden size.
        layers: Decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (default: ``heads``; not for gpt2).
        intermediate: MLP width (default 4 × hidden).
        tied: Tie the output head to the embeddings.
        max_positions: Longest sequence.
        **extra: Further config fields (token ids, ``architectures``...).
    """
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            tie_word_embeddings=tied,
            **extra,
        )
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        **extra,
    )


def tiny_llama(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    seed: int = 0,
    max_positions: int = 128,
):
    """A randomly initialised ``LlamaForCausalLM`` (untied head), seeded.

    Token ids follow :func:`char_tokenizer` (pad 0, bos 1, eos 2).
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(
        vocab=vocab_size,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        max_positions=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)
