"""Exact-match accuracy of a causal LM on prompt/completion JSONL, by greedy decoding.

Prompts are left-padded into batches and decoded greedily (no sampling) until the end
token or ``max_new_tokens``; an answer is correct when the decoded text, stripped of
surrounding whitespace, equals the reference completion exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def exact_match(
    model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 8, batch_size: int = 256
) -> float:
    """Share of rows whose greedy completion equals ``row["completion"]`` exactly.

    Args:
        model: A causal LM (eval mode is set here).
        tokenizer: Its tokenizer (needs a pad token).
        rows: ``{"prompt", "completion"}`` dicts.
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per forward batch.

    Returns:
        Accuracy in [0, 1].
    """
    model.eval()
    device = getattr(model, "device", torch.device("cpu"))  # a test double may have none
    correct = 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = [
            bos + tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in chunk
        ]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
        correct += sum(t.strip() == r["completion"] for t, r in zip(texts, chunk, strict=True))
    return correct / max(1, len(rows))
