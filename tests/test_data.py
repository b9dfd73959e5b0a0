"""Task data: parsing with line numbers, balanced sampling, tokenization and padding."""

from __future__ import annotations

import json

import pytest

from benchmarks.tiny_models import char_tokenizer
from consolidation.data.examples import read_jsonl
from consolidation.data.tasks import balanced_sample
from consolidation.data.tokenize import IGNORE_INDEX, build_dataset, pad_collate, tokenize
from cpi_merge.errors import DataError


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


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        },
    ],
)
def test_conversations_use_the_chat_template(tok, tmp_path, record):
    """As TRL does: the template renders the turn, its end-of-turn markup included."""
    (ex,) = read_jsonl(write(tmp_path, [json.dumps(record)]))
    row = tokenize(ex, tok, 64)
    assert tok.decode(row["input_ids"]) == "u:hi|a:yo|"
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "yo|"


def test_text_is_trained_on_every_token(tok, tmp_path):
    (ex,) = read_jsonl(write(tmp_path, ['{"text": "abc"}']))
    row = tokenize(ex, tok, 64)
    assert tok.decode(row["input_ids"]) == "<s>abc</s>" and row["labels"] == row["input_ids"]


def test_prompts_get_the_tokenizers_own_special_tokens(tmp_path):
    """No BOS forced: a tokenizer that adds none (SmolLM2's) gets none, as in TRL."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE({"<s>": 0, "</s>": 1, "a": 2, "b": 3}, [])),
        bos_token="<s>",
        eos_token="</s>",
    )
    (ex,) = read_jsonl(write(tmp_path, ['{"prompt": "a", "completion": "b"}']))
    assert tokenize(ex, plain, 64)["input_ids"] == [2, 3, 1]


def test_truncation_keeps_the_completion_and_is_counted(tok, tmp_path):
    long = '{"prompt": "' + "a" * 50 + '", "completion": "xyz"}'
    examples = read_jsonl(write(tmp_path, [long, '{"prompt": "a", "completion": "b"}']))
    row = tokenize(examples[0], tok, 10)
    assert len(row["input_ids"]) == 10 and row["truncated"]
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "xyz</s>"
    assert build_dataset(examples, tok, 10, what="t").truncated == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "a"}', "expected string fields"),
        ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant"),
        ('{"messages": []}', "non-empty list"),
        ('{"prompt": [], "completion": [{"role": "assistant", "content": "x"}]}', "non-empty"),
        ('{"text": ""}', "'text' must be a non-empty string"),
        ("{oops", "not valid JSON"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, ['{"prompt": "a", "completion": "b"}', "", line])
    with pytest.raises(DataError, match=f"d.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match="d.jsonl:2: not UTF-8"):
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
