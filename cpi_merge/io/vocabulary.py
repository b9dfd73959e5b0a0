"""Embedding rows compared by token, for recipes with a tokenizer option.

Community fine-tunes often add tokens (a vocabulary of 49,153 against the base's 49,152).
With ``tokenizer_source`` (or the ``tokenizer:`` block), mergekit aligns every model's
vocabulary-indexed tensors (embeddings, output head) to one output vocabulary. The
analysis does the same by token: for each of the base's tokens, a model's row for that
token is compared with the base's row (a model that lacks the token counts as unchanged
there, as mergekit then gives it the base's row). Rows of tokens the base lacks (added
tokens, padding rows) are in no core and not counted in D. The output vocabulary keeps
the base's tokens at their ids (mergekit's ``union`` and ``base`` do; a model's
tokenizer must too, which ``cpi-merge`` checks), so positions in the analysed rows are
positions in the merged tensors, and the merge method needs only the number of rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpi_merge.errors import CheckpointError
from cpi_merge.io.checkpoints import Checkpoint
from cpi_merge.io.lora import is_lora

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabularyAlignment:
    """How the vocabulary-indexed tensors of a recipe's models line up with the base's.

    Attributes:
        rows: The leading rows of the base's vocabulary tensors that are its tokens
            (``base_vocab_rows`` in a resolved recipe); only these rows are analysed.
        tensors: Names of the vocabulary-indexed tensors (vocabulary along axis 0).
        row_maps: Per model folder: each base row's row in that model (-1: the model
            lacks the token), or None when it is the same row.
    """

    rows: int
    tensors: frozenset[str]
    row_maps: dict[str, np.ndarray | None]
    tokens: tuple[str, ...] = ()
    """The base's tokens, by id."""

    def analysed_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the analysis sees of a stored tensor (vocabulary rows cut to ``rows``)."""
        return (self.rows, *shape[1:]) if name in self.tensors else shape

    def align(self, ckpt: Checkpoint, name: str, stored: torch.Tensor, base: torch.Tensor):
        """A model's tensor as the analysis sees it: the base's tokens' rows, in base order.

        Args:
            ckpt: The checkpoint ``stored`` came from (the base or a model).
            name: Tensor name.
            stored: The tensor as stored.
            base: The base's aligned tensor (rows for tokens a model lacks).
        """
        if name not in self.tensors:
            return stored
        rows = self.row_maps.get(ckpt.path)
        if rows is None:
            return stored[: self.rows]
        present = torch.from_numpy(rows >= 0)
        out = base.clone()
        out[present] = stored[torch.from_numpy(rows[rows >= 0]).long()].to(out.dtype)
        return out


def vocabulary_tensors(folder: str) -> dict[str, int]:
    """Vocabulary-indexed tensors of a model folder and their vocabulary axis (mergekit's)."""
    from mergekit.architecture import ConfiguredModelArchitecture, arch_info_for_config
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    arch = arch_info_for_config(config)
    if arch is None:
        raise CheckpointError(
            f"{folder}: mergekit has no architecture definition for {config.architectures}, "
            "so its vocabulary-indexed tensors are unknown; tokenizer options need one"
        )
    weights = ConfiguredModelArchitecture(info=arch, config=config).all_weights()
    return {w.name: w.vocabulary_axis for w in weights if w.vocabulary_axis is not None}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _vocab(folder: str, what: str) -> dict[str, int] | None:
    """The folder's vocabulary; None when it has no tokenizer files at all."""
    from transformers import AutoTokenizer

    if os.path.isdir(folder) and not any(
        os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False).get_vocab()
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{what} {folder!r}: no usable tokenizer ({type(exc).__name__}: {exc}); "
            "tokenizer options compare embedding rows by token"
        ) from None


def align_vocabularies(base: Checkpoint, models: Sequence[tuple[str, Checkpoint]]):
    """Match every model's vocabulary rows to the base's tokens.

    Args:
        base: θ0.
        models: ``(role, checkpoint)`` of every other model.

    Returns:
        The :class:`VocabularyAlignment`.

    Raises:
        CheckpointError: No tokenizer, a vocabulary axis other than 0, or base token ids
            that do not start at 0 without gaps.
    """
    axes = vocabulary_tensors(base.path)
    stored = {n: a for n, a in axes.items() if n in base.tensors}
    if not stored:
        raise CheckpointError(f"base_model {base.path!r}: no vocabulary tensors found")
    if any(a != 0 for a in stored.values()):
        raise CheckpointError(
            f"base_model {base.path!r}: vocabulary along axis {sorted(set(stored.values()))}; "
            "tokenizer options are supported for vocabularies along axis 0 only"
        )
    base_rows = min(base.tensors[n].shape[0] for n in stored)
    vocab = _vocab(base.path, "base_model")
    if vocab is None:
        raise CheckpointError(
            f"base_model {base.path!r} has no tokenizer; tokenizer options need the base's"
        )
    base_vocab = {t: i for t, i in vocab.items() if i < base_rows}
    ids = sorted(base_vocab.values())
    if ids != list(range(len(ids))):
        raise CheckpointError(
            f"base_model {base.path!r}: its token ids have gaps below {base_rows}; "
            "tokenizer options need the base's tokens at ids 0..n-1"
        )
    tokens = [t for t, _ in sorted(base_vocab.items(), key=lambda kv: kv[1])]
    row_maps: dict[str, np.ndarray | None] = {base.path: None}
    for role, ckpt in models:
        rows = min((ckpt.tensors[n].shape[0] for n in stored if n in ckpt.tensors), default=0)
        # A merged LoRA folder holds weights only: its tokenizer is its base's (as mergekit).
        source = ckpt.reference.split("+")[0] if is_lora(ckpt.reference) else ckpt.path
        vocab = _vocab(source, role)
        if vocab is None:  # as mergekit does: a model without a tokenizer uses the base's
            LOG.warning("%s %s has no tokenizer; assuming the base's vocabulary", role, source)
            vocab = base_vocab
        mapped = np.array([vocab.get(t, -1) for t in tokens], dtype=np.int64)
        mapped[mapped >= rows] = -1
        same = np.array_equal(mapped, np.arange(len(tokens)))
        row_maps[ckpt.path] = None if same else mapped
    return VocabularyAlignment(len(tokens), frozenset(stored), row_maps, tuple(tokens))


def check_output_vocabulary(config, alignment: VocabularyAlignment) -> None:
    """Refuse an output vocabulary that moves the base's tokens (mergekit's own build).

    Args:
        config: The ``MergeConfiguration`` mergekit will run.
        alignment: The recipe's vocabulary alignment.

    Raises:
        CheckpointError: A base token gets another id, or the ``tokenizer:`` block forces
            another embedding onto a base token (the analysed rows would not be the merged
            ones).
    """
    from mergekit.tokenizer.build import build_tokenizer

    block = config.tokenizer
    source = block.source if block is not None else config.tokenizer_source
    tokens = dict(block.tokens or {}) if block is not None else {}
    info = build_tokenizer(
        base_model=config.base_model,
        referenced_models=list(config.referenced_models()),
        tokenizer_source=source,
        trust_remote_code=False,
        add_tokens=list(tokens),
    )
    out = info.tokenizer.get_vocab()
    moved = [t for i, t in enumerate(alignment.tokens) if out.get(t) != i]
    if moved:
        raise CheckpointError(
            f"the output vocabulary (tokenizer source {source}) gives {len(moved)} of the base "
            f"model's tokens other ids (e.g. {moved[:3]}); cpi needs the base's tokens at "
            "their ids: use `tokenizer_source: union` or `base`"
        )
    ours = set(alignment.tokens)
    forced = sorted(t for t, cfg in tokens.items() if t in ours and cfg.force)
    if forced:
        raise CheckpointError(
            f"tokenizer.tokens forces another embedding onto the base's tokens {forced[:5]}; "
            "cpi analyses the base's tokens as the models store them: force only added tokens"
        )
