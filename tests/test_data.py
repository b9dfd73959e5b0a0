"""Task data: parsing with line numbers, balanced sampling, tokenization and padding."""

from __future__ import annotations

import json

import pytest

from benchmarks.tiny_models import char_tokenizer
from consolidation.data import (
    IGNORE_INDEX,
    DataError,
    balanced_sample,
    build_dataset,
    pad_collate,
    read_jsonl,
    tokenize,
)


@pytest.fixture(scope="module")
def tok():
    t = char_tokenizer()
    t.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    return t


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_completion_labels_only_on_completion(tok, tmp_path):
    (ex,) = read_jsonl(write(tmp_path, ['{"prompt": "rev:abc>", "completion": "cba"}']))
    row = tokenize(ex, tok, 64)
    n_prompt = 1 + len("rev:abc>")  # bos + characters
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(row["labels"][n_prompt:]) == "cba</s>"
    assert len(row["input_ids"]) == len(row["labels"])


def test_messages_use_the_chat_template(tok, tmp_path):
    line = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    (ex,) = read_jsonl(write(tmp_path, [line]))
    row = tokenize(ex, tok, 64)
    assert tok.decode(row["input_ids"]) == "u:hi|a:yo</s>"
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "yo</s>"


def test_truncation_keeps_the_completion(tok, tmp_path):
    (ex,) = read_jsonl(write(tmp_path, ['{"prompt": "' + "a" * 50 + '", "completion": "xyz"}']))
    row = tokenize(ex, tok, 10)
    assert len(row["input_ids"]) == 10
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "xyz</s>"


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "a"}', "expected string fields"),
        ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant"),
        ('{"messages": []}', "non-empty list"),
        ("{oops", "not valid JSON"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, ['{"prompt": "a", "completion": "b"}', "", line])
    with pytest.raises(DataError, match=f"d.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(write(tmp_path, ["", "  "]))


def test_balanced_sample_is_seeded_and_checked(tmp_path):
    rows = read_jsonl(
        write(tmp_path, [json.dumps({"prompt": str(i), "completion": "x"}) for i in range(20)])
    )
    a = balanced_sample(rows, 5, seed=1, task="t")
    assert a == balanced_sample(rows, 5, seed=1, task="t") and len(a) == 5
    assert a != balanced_sample(rows, 5, seed=2, task="t")
    assert balanced_sample(rows, None, seed=0, task="t") == rows
    with pytest.raises(DataError, match="fewer than samples_per_task"):
        balanced_sample(rows, 21, seed=0, task="t")


def test_collate_pads_to_the_longest(tok, tmp_path):
    ds = build_dataset(
        read_jsonl(
            write(
                tmp_path,
                ['{"prompt": "ab", "completion": "c"}', '{"prompt": "abcd", "completion": "e"}'],
            )
        ),
        tok,
        64,
        what="t",
    )
    batch = pad_collate(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][0].sum()) == len(ds[0]["input_ids"])
