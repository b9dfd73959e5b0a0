"""Direct reads of safetensors tensors: the same bits as safetensors' own loader."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpi_merge.errors import CheckpointError
from cpi_merge.io.direct_read import ReadSlot, ShardReader


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(7, 5, generator=g).bfloat16(),
        "f16": torch.randn(3, 4, 2, generator=g).half(),
        "f32": torch.randn(11, generator=g),
        "f64": torch.randn(2, 3, generator=g).double(),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "ints": torch.arange(6).view(2, 3),
    }


def test_every_float_tensor_reads_bit_for_bit(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file(tensors(), path, metadata={"format": "pt"})
    expected = load_file(path)
    reader = ShardReader(path)
    try:
        for name, want in expected.items():
            got = reader.read(name)
            if not want.dtype.is_floating_point:
                assert got is None  # left to mergekit's loader
                continue
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    finally:
        reader.close()


def test_a_truncated_file_names_the_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(1000)}, str(path))
    reader = ShardReader(str(path))
    os.truncate(path, path.stat().st_size - 100)  # changed after it was checked
    try:
        assert torch.equal(reader.read("a"), torch.ones(4))
        with pytest.raises(CheckpointError, match=r"ends inside tensor 'b' .*truncated"):
            reader.read("b")
        with pytest.raises(CheckpointError, match="no tensor 'c'"):
            reader.read("c")
    finally:
        reader.close()


def test_an_unreadable_header_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((50).to_bytes(8, "little") + b"{not json")
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        ShardReader(str(path))


def test_a_pass_reads_every_tensor_as_the_loader_does_without_its_shard_mapping(tiny_family):
    from cpi_merge.io.checkpoints import open_checkpoint

    base, _ = tiny_family
    direct = open_checkpoint(str(base), role="base_model")
    mapped = open_checkpoint(str(base), role="base_model")
    for info in direct.float_tensors:
        got, want = direct.read(info.name), mapped.get(info.name)
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert "loader" not in direct.__dict__  # mergekit's mapping loader never opened
    direct.close()
    assert "_shard_reader" not in direct.__dict__


def test_a_slot_maps_each_tensor_and_holds_only_the_newest(tmp_path):
    import weakref

    path = tmp_path / "m.safetensors"
    data = tensors()
    save_file(data, str(path))
    before = path.read_bytes()
    reader, slot = ShardReader(str(path)), ReadSlot()
    try:
        for name in ("f32", "bf16", "f16", "f64", "scalar", "empty"):
            got = reader.read(name, slot)
            assert got.dtype == data[name].dtype and torch.equal(got, data[name])
        first = reader.read("f32", slot)
        first.mul_(2)  # copy-on-write: the file never changes
        gone = weakref.ref(first)
        del first
        reader.read("bf16", slot)
        assert gone() is None  # the slot let go of the older tensor (and its mapping)
        assert torch.equal(reader.read("f32", slot), data["f32"])
    finally:
        reader.close()
    assert path.read_bytes() == before


def test_a_truncated_file_names_the_tensor_when_mapped(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(1000)}, str(path))
    reader, slot = ShardReader(str(path)), ReadSlot()
    os.truncate(path, path.stat().st_size - 100)
    try:
        assert torch.equal(reader.read("a", slot), torch.ones(4))
        with pytest.raises(CheckpointError, match=r"ends inside tensor 'b' .*truncated"):
            reader.read("b", slot)
    finally:
        reader.close()
