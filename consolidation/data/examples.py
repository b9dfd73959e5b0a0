"""Reading task data: JSONL files in TRL's four SFT dataset formats, line-numbered errors.

One example per line (blank lines are skipped):

* standard prompt-completion: ``{"prompt": "...", "completion": "..."}``
* conversational prompt-completion: ``{"prompt": [messages], "completion": [messages]}``
* conversational language modeling: ``{"messages": [messages]}`` whose last message is
  the assistant's answer
* standard language modeling: ``{"text": "..."}``

A message is ``{"role": ..., "content": "..."}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cpi_merge.errors import DataError

Kind = Literal["prompt_completion", "conversational", "messages", "text"]


@dataclass(frozen=True)
class Example:
    """One training example, in the format it was written in.

    Attributes:
        kind: Which of the four formats.
        prompt: The prompt: text, or messages (empty for ``text``).
        completion: The completion: text, or messages (the whole text for ``text``).
    """

    kind: Kind
    prompt: str | tuple[dict, ...]
    completion: str | tuple[dict, ...]


def _messages(value, where: str, field: str) -> tuple[dict, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value
        )
    )
    if not ok:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}}")
    return tuple(value)


def parse_example(record, where: str) -> Example:
    """Validate one decoded JSON record.

    Raises:
        DataError: Naming ``where`` (file:line) and what is wrong.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        return Example("messages", messages[:-1], messages[-1:])
    if "text" in record and "prompt" not in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Example("text", "", record["text"])
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        return Example(
            "conversational",
            _messages(prompt, where, "prompt"),
            _messages(completion, where, "completion"),
        )
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(
            f"{where}: expected string fields 'prompt' and 'completion' (or 'messages', or "
            f"'text'); found keys {sorted(record)}"
        )
    if not completion:
        raise DataError(f"{where}: 'completion' is empty (nothing to learn)")
    return Example("prompt_completion", prompt, completion)


def read_jsonl(path: str | Path) -> list[Example]:
    """Read every example of a JSONL file.

    Raises:
        DataError: Missing or unreadable file, a malformed line or one that is not UTF-8
            (with its number), or no examples at all.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise DataError(f"data file {str(path)!r} cannot be read: {exc}") from None
    examples = []
    for number, raw in enumerate(data.splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        examples.append(parse_example(record, where))
    if not examples:
        raise DataError(f"data file {str(path)!r} holds no examples")
    return examples
