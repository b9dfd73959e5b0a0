"""Checkpoint layout and header checks: each bad folder named with what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from cpi_merge.errors import CheckpointError
from cpi_merge.io.checkpoints import open_checkpoint
from cpi_merge.io.compatibility import check_compatible

from helpers.files import write_model

TENSORS = {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(8), "c.weight": torch.ones(3)}


def sharded(tmp_path):
    return write_model(tmp_path / "m", TENSORS, shard_bytes=50)


def test_reads_headers_only(tmp_path):
    ckpt = open_checkpoint(str(sharded(tmp_path)), role="base_model")
    assert {t.name: t.shape for t in ckpt.float_tensors} == {
        "a.weight": (4, 4),
        "b.weight": (8,),
        "c.weight": (3,),
    }
    assert torch.equal(ckpt.get("a.weight"), TENSORS["a.weight"])


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="models\\[1\\] .*: no such folder"):
        open_checkpoint(str(tmp_path / "nope"), role="models[1]")


def test_hub_id_that_cannot_be_fetched(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="fetching it from the Hugging Face Hub failed"):
        open_checkpoint("no-such-org/no-such-model-xyz", role="base_model")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="is a file"):
        open_checkpoint(str(f), role="base_model")


def test_lora_reference_refused(tmp_path):
    with pytest.raises(CheckpointError, match="LoRA"):
        open_checkpoint(f"{tmp_path}+adapter", role="models[0]")


def test_no_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(str(tmp_path / "empty"), role="base_model")


def test_pickle_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    torch.save(TENSORS, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(str(folder), role="base_model")
    ckpt = open_checkpoint(str(folder), role="base_model", allow_pickle=True)
    assert ckpt.tensors["a.weight"].shape == (4, 4)
    assert torch.equal(ckpt.get("b.weight"), TENSORS["b.weight"])


def test_truncated_shard(tmp_path):
    folder = write_model(tmp_path / "m", TENSORS)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        open_checkpoint(str(folder), role="base_model")


def test_both_single_file_and_index(tmp_path):
    folder = sharded(tmp_path)
    write_model(tmp_path / "single", TENSORS)
    (folder / "model.safetensors").write_bytes(
        (tmp_path / "single" / "model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="both model.safetensors and"):
        open_checkpoint(str(folder), role="base_model")


def _edit_index(folder, edit):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/abs/x.safetensors", "sub/x.safetensors"])
def test_index_with_unsafe_shard_names(tmp_path, bad):
    folder = sharded(tmp_path)
    _edit_index(folder, lambda wm: wm.__setitem__("a.weight", bad))
    with pytest.raises(CheckpointError, match="plain file names"):
        open_checkpoint(str(folder), role="base_model")


def test_index_names_missing_shard(tmp_path):
    folder = sharded(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file"):
        open_checkpoint(str(folder), role="base_model")


def test_shard_holds_unlisted_tensor(tmp_path):
    folder = sharded(tmp_path)
    _edit_index(folder, lambda wm: wm.pop("b.weight"))
    with pytest.raises(CheckpointError, match="does not list"):
        open_checkpoint(str(folder), role="base_model")


def test_index_lists_tensor_shard_lacks(tmp_path):
    folder = sharded(tmp_path)
    _edit_index(folder, lambda wm: wm.__setitem__("z.weight", "model-00001-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="does not hold"):
        open_checkpoint(str(folder), role="base_model")


def test_stale_shard(tmp_path):
    folder = sharded(tmp_path)
    (folder / "model-00003-of-00003.safetensors").write_bytes(
        (folder / "model-00001-of-00002.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="not listed"):
        open_checkpoint(str(folder), role="base_model")


def test_compatibility_lists_every_problem(tmp_path):
    base = open_checkpoint(str(write_model(tmp_path / "b", TENSORS)), role="base_model")
    other = dict(TENSORS)
    other["a.weight"] = torch.ones(4, 5)
    other.pop("c.weight")
    other["lm_head.weight"] = torch.ones(2)
    task = open_checkpoint(str(write_model(tmp_path / "t", other)), role="models[0]")
    with pytest.raises(CheckpointError) as err:
        check_compatible(base, [("models[0]", task)])
    text = str(err.value)
    assert "lacks 1 tensor(s) of the base: ['c.weight']" in text
    assert "tied vs untied" in text
    assert "'a.weight' has shape [4, 5], base has [4, 4]" in text


def test_a_duplicate_tensor_name_in_a_header_is_named(tmp_path):
    import struct

    folder = tmp_path / "dup"
    folder.mkdir()
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [%d, %d]}'
    header = ('{"w": ' + entry % (0, 8) + ', "w": ' + entry % (8, 16) + "}").encode()
    header += b" " * (-len(header) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"\['w'\] more than once \(duplicate tensor name\)"):
        open_checkpoint(str(folder), role="base_model")
