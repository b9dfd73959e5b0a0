"""Task data: JSONL files read with line-numbered errors, balanced seeded samples, tokenization.

Each line is one example, either ``{"prompt": ..., "completion": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the assistant's
answer (the rest is rendered with the tokenizer's chat template). The loss is on the
completion tokens only (prompt positions get label -100); the end-of-sequence token is
appended when the tokenizer has one. Examples longer than ``max_length`` are truncated
from the left of the prompt, never inside the completion when avoidable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cpi_merge.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training example, as text."""

    prompt: str
    completion: str
    messages: tuple[dict, ...] | None = None


def _parse_line(path: Path, number: int, line: str) -> Example:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
                for m in messages
            )
        )
        if not ok:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        return Example("", messages[-1]["content"], tuple(messages))
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(
            f"{where}: expected string fields 'prompt' and 'completion' (or 'messages'); "
            f"found keys {sorted(record)}"
        )
    if not completion:
        raise DataError(f"{where}: 'completion' is empty (nothing to learn)")
    return Example(prompt, completion)


def read_jsonl(path: str | Path) -> list[Example]:
    """Read every example of a JSONL file (blank lines are skipped).

    Raises:
        DataError: Missing or unreadable file, a malformed line (with its number), or
            no examples at all.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data file {str(path)!r} cannot be read: {exc}") from None
    examples = [
        _parse_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()
    ]
    if not examples:
        raise DataError(f"data file {str(path)!r} holds no examples")
    return examples


def balanced_sample(
    examples: Sequence[Example], size: int | None, *, seed: int, task: str
) -> list[Example]:
    """A seeded sample of ``size`` examples (all of them when ``size`` is None).

    Raises:
        DataError: Fewer examples than requested (a balanced sample is impossible).
    """
    if size is None:
        return list(examples)
    if len(examples) < size:
        raise DataError(
            f"task {task!r} has {len(examples)} examples, fewer than samples_per_task = {size}; "
            "lower samples_per_task or add data"
        )
    return random.Random(f"{seed}:{task}").sample(list(examples), size)


def render(example: Example, tokenizer) -> tuple[str, str]:
    """Prompt and completion text (chat examples go through the chat template)."""
    if example.messages is None:
        return example.prompt, example.completion
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("a 'messages' example needs a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(
        list(example.messages[:-1]), tokenize=False, add_generation_prompt=True
    )
    return prompt, example.completion


def tokenize(example: Example, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids with labels on the completion only."""
    prompt, completion = render(example, tokenizer)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None and example.messages is None:
        p = [tokenizer.bos_token_id] + p
    if len(p) + len(c) > max_length:
        keep_prompt = max(0, max_length - len(c))
        p = p[len(p) - keep_prompt :] if keep_prompt else []
        c = c[: max_length - len(p)]
    return {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenized examples (input_ids, labels)."""

    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

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
    rows = [r for r in rows if any(label != IGNORE_INDEX for label in r["labels"])]
    if not rows:
        raise DataError(f"{what}: no example has a completion token to train on")
    return TokenizedDataset(rows)


def pad_collate(pad_id: int):
    """A collator that right-pads input_ids (with ``pad_id``) and labels (with -100)."""

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def task_datasets(cfg, tokenizer) -> dict[str, TokenizedDataset]:
    """Read, sample and tokenize every task's data: the one path from JSONL to training rows.

    Every file is read and sampled before anything is tokenized, so a bad file is
    reported first.

    Args:
        cfg: A consolidation or probe config (its ``data``, ``samples_per_task`` (None:
            every example), ``seed`` and ``training.max_length``).
        tokenizer: The model's tokenizer.

    Returns:
        Task name → tokenized dataset, in the order of ``cfg.data``.

    Raises:
        DataError: A file is missing or malformed, or too small for the sample.
    """
    samples = {
        task: balanced_sample(read_jsonl(path), cfg.samples_per_task, seed=cfg.seed, task=task)
        for task, path in cfg.data.items()
    }
    return {
        task: build_dataset(rows, tokenizer, cfg.training.max_length, what=f"task {task!r}")
        for task, rows in samples.items()
    }


def collator(tokenizer):
    """:func:`pad_collate` with the tokenizer's pad token (0 when it has none)."""
    return pad_collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
