"""Added tokens: with a tokenizer option, embedding rows are compared by token."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import yaml

from cpi_merge.commands import analyze
from cpi_merge.errors import CheckpointError

from helpers.files import load_folder, merged, write_recipe
from helpers.hf_models import make_hf_family
from helpers.references import assert_plan_matches, brute_force

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def save_word_tokenizer(folder, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)


def base_vocab():
    return {f"t{i}": i for i in range(96)}


def add_token(folder, token, row):
    """Give a model one more token: a new last row in the embedding and the head."""
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = safetensors.torch.load_file(shard)
        for name in (EMBED, HEAD):
            if name in tensors:
                tensors[name] = torch.cat([tensors[name], row.to(tensors[name].dtype)[None]])
        safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    vocab = base_vocab()
    vocab[token] = 96
    save_word_tokenizer(folder, vocab)


@pytest.fixture
def family(tmp_path):
    """Base + 3 tasks (untied Llama, bf16: ties too); task_2 added the token 'newtok'."""
    base, tasks = make_hf_family(tmp_path, "llama", dtype=torch.bfloat16, shard="1MB")
    for folder in [base, *tasks]:
        save_word_tokenizer(folder, base_vocab())
    new_row = torch.full((16,), 0.5)
    add_token(tasks[2], "newtok", new_row)
    return base, tasks, new_row


def by_token(folder):
    """A model's tensors with the base's 96 token rows (what the analysis compares)."""
    tensors = load_folder(folder)
    return {n: (v[:96] if n in (EMBED, HEAD) else v) for n, v in tensors.items()}


def recipe_with(tmp_path, base, tasks, **top):
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), **top}))
    return recipe


def test_without_a_tokenizer_option_the_mismatch_names_the_option(family, tmp_path):
    base, tasks, _ = family
    with pytest.raises(CheckpointError, match="tokenizer_source: union"):
        analyze(recipe_with(tmp_path, base, tasks), progress=False)


@pytest.mark.parametrize("strategy", ["buffer", "histogram"])
def test_cores_compare_rows_by_token_and_new_rows_are_not_counted(family, tmp_path, strategy):
    base, tasks, _ = family
    recipe = recipe_with(tmp_path, base, tasks, tokenizer_source="union")
    plan = analyze(recipe, progress=False, strategy=strategy)
    assert plan.vocabulary_rows == 96 and sorted(plan.vocabulary_tensors) == [HEAD, EMBED]
    ref = brute_force(by_token(base), [by_token(t) for t in tasks], 0.05)
    assert_plan_matches(plan, ref)  # D and every core on the base's tokens only


def test_merged_vocabulary_rows_and_tokenizer_agree(family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tasks, new_row = family
    recipe = recipe_with(tmp_path, base, tasks, tokenizer_source="union")
    result = merged(recipe, tmp_path / "out")
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = model.get_input_embeddings().weight.shape[0]
    assert model.config.vocab_size == rows == len(tokenizer) == 97
    assert tokenizer("newtok")["input_ids"] == [96]
    fused = load_folder(out)
    task_rows = load_folder(tasks[2])
    for name in (EMBED, HEAD):  # the added token's row: mergekit's aligned value (its donor)
        assert torch.equal(fused[name][96], task_rows[name][96])
    resolved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert resolved["parameters"]["base_vocab_rows"] == 96
    # the same merge from the resolved recipe alone (run_merge finds every core itself)
    given = tmp_path / "given.yml"
    given.write_text(yaml.safe_dump(resolved))
    merged(given, tmp_path / "again")
    again = load_folder(tmp_path / "again")
    assert fused.keys() == again.keys() and all(torch.equal(fused[k], again[k]) for k in fused)
    assert result.plan.vocabulary_rows == 96
    # ... and the base's rows are exactly the merge of the same models without the token
    trimmed = tmp_path / "trimmed"
    import shutil

    shutil.copytree(tasks[2], trimmed)
    for shard in trimmed.glob("*.safetensors"):
        tensors = {
            n: (v[:96] if n in (EMBED, HEAD) else v)
            for n, v in safetensors.torch.load_file(shard).items()
        }
        safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((trimmed / "config.json").read_text())
    (trimmed / "config.json").write_text(json.dumps({**config, "vocab_size": 96}))
    save_word_tokenizer(trimmed, base_vocab())
    plain = write_recipe(tmp_path / "p.yml", base, [*tasks[:2], trimmed], core_fraction=0.05)
    merged(plain, tmp_path / "plain")
    without = load_folder(tmp_path / "plain")
    for name, value in without.items():
        assert torch.equal(fused[name][: value.shape[0]], value), name


def test_an_output_vocabulary_that_moves_base_tokens_is_refused(family, tmp_path):
    base, tasks, _ = family
    moved = {f"t{i}": (i + 1) % 96 for i in range(96)}
    save_word_tokenizer(tasks[0], moved)
    recipe = recipe_with(tmp_path, base, tasks, tokenizer_source=str(tasks[0]))
    with pytest.raises(CheckpointError, match="other ids"):
        merged(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option",
    [{"tokenizer": {"source": "union"}}, {"tokenizer_source": "task_2"}],
    ids=["tokenizer-block", "source-model"],
)
def test_other_tokenizer_options_give_the_union_merge(family, tmp_path, option):
    """The `tokenizer:` block and a model as the source (here the one with the added token,
    so every base token keeps its id) merge exactly like `tokenizer_source: union`."""
    base, tasks, _ = family
    if "tokenizer_source" in option:
        option = {"tokenizer_source": str(tasks[2])}
    union = recipe_with(tmp_path, base, tasks, tokenizer_source="union")
    merged(union, tmp_path / "union")
    doc = yaml.safe_load(union.read_text())
    del doc["tokenizer_source"]
    other = tmp_path / "other.yml"
    other.write_text(yaml.safe_dump(doc | option))
    merged(other, tmp_path / "other")
    a, b = load_folder(tmp_path / "union"), load_folder(tmp_path / "other")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chat_template_reaches_the_output_tokenizer(family, tmp_path):
    from transformers import AutoTokenizer

    base, tasks, _ = family
    recipe = recipe_with(tmp_path, base, tasks, tokenizer_source="union", chat_template="chatml")
    merged(recipe, tmp_path / "out")
    template = AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
    assert template is not None and "<|im_start|>" in template
