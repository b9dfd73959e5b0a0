"""Greedy exact match of a chat model in one forward pass per batch, and its answer loss.

Greedy decoding returns the reference answer exactly when, at every position of the
answer (and of the end-of-turn token that stops decoding), the most likely next token
given the reference so far IS the reference token. So instead of generating token by
token, each prompt + reference answer is run once (teacher forcing) and every answer
position's argmax is compared with the reference: the same verdict as greedy decoding
for answers written the way the tokenizer writes them (the training data's own ids),
at the cost of one forward pass. Prompts and answers are tokenized exactly as training
tokenizes them (:func:`consolidation.data.tokenize.prompt_and_completion`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from consolidation.data.examples import parse_example
from consolidation.data.tokenize import prompt_and_completion


@dataclass(frozen=True)
class ChatScore:
    """Exact match (share of rows) and mean per-token loss of the reference answers."""

    exact_match: float
    answer_loss: float


def encode(rows: Sequence[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids up to and including the first end token) per row."""
    stop = tokenizer.eos_token_id
    encoded = []
    for i, row in enumerate(rows):
        prompt, completion = prompt_and_completion(parse_example(row, f"row {i}"), tokenizer)
        if stop in completion:
            completion = completion[: completion.index(stop) + 1]
        encoded.append((prompt, completion))
    return encoded


@torch.no_grad()
def score_chat(
    model, tokenizer, rows: Sequence[dict], *, batch_size: int = 64, device: str = "cpu"
) -> ChatScore:
    """Greedy exact match and answer loss of ``model`` on prompt/completion rows.

    Args:
        model: A causal LM (eval mode is set here), already on ``device``.
        tokenizer: Its tokenizer (the one training used).
        rows: Examples in TRL's prompt-completion formats.
        batch_size: Rows per forward pass.
        device: Where the model is.

    Returns:
        The exact-match share and the mean per-token cross-entropy of the answers.
    """
    model.eval()
    encoded = encode(rows, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct, loss_sum, tokens = 0, 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        keep = max(len(c) for _, c in chunk) + 1  # logits for every answer position
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(chunk):  # left padding: every answer ends at `width`
            ids[i, width - len(p) - len(c) :] = torch.tensor(p + c)
            mask[i, width - len(p) - len(c) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as in training: 0 at the first token
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
        ).logits.float()
        for i, (_, c) in enumerate(chunk):
            # logits[:, j] predicts token width - keep + j + 1; the answer is the last len(c)
            predicting = logits[i, keep - 1 - len(c) : keep - 1]
            target = torch.tensor(c, device=predicting.device)
            correct += bool((predicting.argmax(-1) == target).all())
            loss_sum += float(
                torch.nn.functional.cross_entropy(predicting, target, reduction="sum")
            )
            tokens += len(c)
    return ChatScore(correct / max(1, len(rows)), loss_sum / max(1, tokens))
