"""Held-out general text: what a merge or fine-tune does to the model's pretrained ability.

The text is the prose of the Python Language Reference as every CPython ships it
(``pydoc_data.topics``, the text ``help()`` shows; PSF licence): English paragraphs about
a subject none of the benchmark's tasks touch, available offline everywhere. Code
blocks, grammar rules and headings are dropped; the paragraphs are joined in a fixed
order and cut into windows of ``window`` tokens. The measure is the mean per-token
cross-entropy (nats) of the model on those windows: lower is better, and a rise after a
fine-tune or merge is pretrained ability lost.
"""

from __future__ import annotations

import torch

MIN_WORDS = 25


def paragraphs() -> list[str]:
    """The reference's prose paragraphs (no code, grammar or headings), in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            lines = block.splitlines()
            if not lines or any(line.startswith(" ") or "::=" in line for line in lines):
                continue  # indented: code, grammar or a table
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= MIN_WORDS and text.endswith("."):
                out.append(text)
    return out


def windows(tokenizer, n_windows: int, window: int) -> list[list[int]]:
    """``n_windows`` token windows of exactly ``window`` tokens from the paragraphs.

    Raises:
        ValueError: The text has fewer tokens than asked for.
    """
    ids: list[int] = []
    for text in paragraphs():
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_windows * window:
            return [ids[i * window : (i + 1) * window] for i in range(n_windows)]
    raise ValueError(f"the general text has {len(ids)} tokens, fewer than {n_windows * window}")


@torch.no_grad()
def general_loss(
    model, token_windows: list[list[int]], *, batch_size: int = 8, device: str = "cpu"
) -> float:
    """Mean per-token cross-entropy (nats) of ``model`` on the windows (next-token loss)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(token_windows), batch_size):
        ids = torch.tensor(token_windows[start : start + batch_size], device=device)
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    return total / max(1, count)
