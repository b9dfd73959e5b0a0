"""Input hashes started before mergekit is imported: same digests, redone if a file changed."""

from __future__ import annotations

import hashlib
import mmap
import os

import yaml

from cpi_merge import checksums
from cpi_merge.cli.merge_entry import local_inputs


def _folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    return folder


def _reference(folder):
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.iterdir())
        if p.name.endswith(checksums.HASHED_SUFFIXES)
    }


def test_background_digests_equal_hashlib(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "_WINDOW", mmap.PAGESIZE)  # several windows per file
    big = os.urandom(3 * mmap.PAGESIZE + 100)
    folder = _folder(
        tmp_path,
        "m",
        {"model.safetensors": big, "config.json": b"{}", "empty.txt": b"", "notes.md": b"x"},
    )
    checksums.start_background([folder, tmp_path / "missing"])
    checksums._JOBS[os.path.realpath(folder)].result.result()  # done in the background
    monkeypatch.setattr(checksums, "hash_file", lambda p: 1 / 0)  # so not hashed again
    got = checksums.folder_digests(folder)
    assert got == _reference(folder) and "notes.md" not in got
    monkeypatch.undo()
    assert checksums.hash_folder(folder) == got


def test_a_file_changed_after_the_background_hash_is_hashed_again(tmp_path, monkeypatch):
    folder = _folder(tmp_path, "m", {"model.safetensors": b"a" * 100})
    checksums.start_background([folder])
    checksums._JOBS[os.path.realpath(folder)].result.result()  # hashed the old bytes
    (folder / "model.safetensors").write_bytes(b"b" * 101)
    assert checksums.folder_digests(folder) == _reference(folder)
    checksums.start_background([folder])
    checksums._JOBS[os.path.realpath(folder)].result.result()
    (folder / "added.json").write_bytes(b"{}")  # a new file: hashed too
    assert checksums.folder_digests(folder) == _reference(folder)


def test_local_inputs_of_the_command_line(tmp_path):
    a, b = _folder(tmp_path, "a", {}), _folder(tmp_path, "b", {})
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "cpi",
                "base_model": str(a),
                "models": [{"model": str(b)}, {"model": "org/hub-model"}],
            }
        )
    )
    assert local_inputs([str(recipe), "out", "--cuda"]) == [str(a), str(b)]
    assert local_inputs(["--out-shard-size", "1B", str(recipe), "out"]) == [str(a), str(b)]
    assert local_inputs([str(recipe), "out", "--no-checksums"]) == []
    assert local_inputs([str(recipe), "--help"]) == []
    assert local_inputs([str(tmp_path / "nope.yml"), "out"]) == []
    recipe.write_text("merge_method: [")  # not YAML: the command itself will say so
    assert local_inputs([str(recipe), "out"]) == []
