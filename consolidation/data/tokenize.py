"""Token ids with labels on the completion only, as TRL's SFT trainer builds them.

* standard prompt-completion: the prompt is tokenized as the tokenizer does by default
  (with its own special tokens, e.g. a BOS where it adds one), the completion without
  special tokens, and the EOS token is appended;
* conversational prompt-completion and ``messages``: the chat template renders the
  prompt (with the generation prompt) and the whole conversation; the completion is what
  the conversation adds after the prompt (its end-of-turn markup included);
* ``text``: tokenized as is, EOS appended, every token trained on.

The loss is on the completion (prompt positions get label -100). Examples longer than
``max_length`` lose the left of their prompt first, then the end of their completion;
how many were cut is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from consolidation.data.examples import Example
from cpi_merge.errors import DataError

IGNORE_INDEX = -100


def _template(tokenizer, messages, *, generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("a conversational example needs a tokenizer with a chat template")
    ids = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=generation_prompt
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def prompt_and_completion(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    """The example's prompt ids and completion ids (see the module docstring)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.kind == "text":
        ids = tokenizer(example.completion)["input_ids"]
        return [], ids + (eos if ids[-1:] != eos else [])
    if example.kind == "prompt_completion":
        p = tokenizer(example.prompt)["input_ids"]
        return p, tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos
    p = _template(tokenizer, example.prompt, generation_prompt=True)
    full = _template(tokenizer, [*example.prompt, *example.completion], generation_prompt=False)
    if full[: len(p)] != p:
        raise DataError(
            "the chat template renders the prompt differently inside the whole conversation; "
            "the completion cannot be separated from it"
        )
    return p, full[len(p) :]


def tokenize(example: Example, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids with labels on the completion only (``truncated`` tells if it was cut)."""
    p, c = prompt_and_completion(example, tokenizer)
    truncated = len(p) + len(c) > max_length
    if truncated:
        keep_prompt = max(0, max_length - len(c))
        p = p[len(p) - keep_prompt :] if keep_prompt else []
        c = c[: max_length - len(p)]
    return {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c, "truncated": truncated}


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenized examples (input_ids, labels)."""

    def __init__(self, rows: list[dict[str, list[int]]], truncated: int = 0):
        self.rows = rows
        self.truncated = truncated
        """How many examples were longer than ``max_length`` and cut."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def build_dataset(
    examples: Sequence[Example], tokenizer, max_length: int, *, what: str
) -> TokenizedDataset:
    """Tokenize examples; refuse an empty result.

    Raises:
        DataError: No example has a completion token left.
    """
    rows = [tokenize(e, tokenizer, max_length) for e in examples]
    truncated = sum(r.pop("truncated") for r in rows)
    rows = [r for r in rows if any(label != IGNORE_INDEX for label in r["labels"])]
    if not rows:
        raise DataError(f"{what}: no example has a completion token to train on")
    return TokenizedDataset(rows, truncated)


@dataclass(frozen=True)
class PadCollate:
    """Right-pads input_ids (with ``pad_id``) and labels (with -100) to the longest row."""

    pad_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """One padded batch: input_ids, labels and attention_mask."""
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_collate(pad_id: int) -> PadCollate:
    """A collator that right-pads input_ids (with ``pad_id``) and labels (with -100)."""
    return PadCollate(pad_id)


def collator(tokenizer) -> PadCollate:
    """:func:`pad_collate` with the tokenizer's pad token (0 when it has none)."""
    return PadCollate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
