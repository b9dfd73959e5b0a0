"""Tiny models for tests, the demo and CPU benchmarks: a character tokenizer and a small Llama.

Nothing is downloaded: the tokenizer is built from an alphabet with the ``tokenizers``
library (a BPE with no merges is a character tokenizer) and the model from a config.
"""

from __future__ import annotations

import string

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DEFAULT_ALPHABET = string.ascii_lowercase + string.digits + " :=+-|>,.?"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A fast character-level tokenizer (``PreTrainedTokenizerFast``) over ``alphabet``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
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
    """A randomly initialised ``LlamaForCausalLM`` (untied head), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)
