"""The manifest's input hashes: started before mergekit is imported, redone if a file changed."""

from __future__ import annotations

import hashlib
import mmap
import os

import yaml
from click.testing import CliRunner

from cpi_merge.cli import merge as merge_cli
from cpi_merge.io import manifest as manifest_module
from cpi_merge.io.manifest import Manifest


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
        if p.name.endswith(manifest_module.HASHED_SUFFIXES)
    }


def _wait(manifest, folder):
    manifest._inputs[os.path.realpath(folder)][1].result()  # done in the background


def test_background_digests_equal_hashlib(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "_WINDOW", mmap.PAGESIZE)  # several windows per file
    big = os.urandom(3 * mmap.PAGESIZE + 100)
    folder = _folder(
        tmp_path,
        "m",
        {"model.safetensors": big, "config.json": b"{}", "empty.txt": b"", "notes.md": b"x"},
    )
    manifest = Manifest()
    manifest.hash_inputs([folder, tmp_path / "missing"])
    _wait(manifest, folder)
    monkeypatch.setattr(manifest_module, "hash_file", lambda p: 1 / 0)  # so not hashed again
    got = manifest.input_digests(folder)
    assert got == _reference(folder) and "notes.md" not in got
    monkeypatch.undo()
    assert manifest_module.hash_folder(folder) == got


def test_a_file_changed_after_the_background_hash_is_hashed_again(tmp_path):
    folder = _folder(tmp_path, "m", {"model.safetensors": b"a" * 100})
    manifest = Manifest()
    manifest.hash_inputs([folder])
    _wait(manifest, folder)  # hashed the old bytes
    (folder / "model.safetensors").write_bytes(b"b" * 101)
    assert manifest.input_digests(folder) == _reference(folder)
    manifest.hash_inputs([folder])
    _wait(manifest, folder)
    (folder / "added.json").write_bytes(b"{}")  # a new file: hashed too
    assert manifest.input_digests(folder) == _reference(folder)


def test_a_disabled_manifest_hashes_nothing(tmp_path):
    folder = _folder(tmp_path, "m", {"model.safetensors": b"a"})
    manifest = Manifest(enabled=False)
    manifest.hash_inputs([folder])
    assert manifest._inputs == {} and manifest.input_digests(folder) is None


def test_the_command_line_starts_hashing_the_recipe_inputs_and_hands_the_manifest_on(
    tmp_path, monkeypatch
):
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
    seen = []

    class Recorder:
        @staticmethod
        def main(args, prog_name, obj):
            assert obj.ahead is None  # a Hub model: nothing is opened before the full parse
            seen.append((args, sorted(obj.manifest._inputs), obj.manifest.enabled))

    import cpi_merge.cli.merge_command as full

    monkeypatch.setattr(full, "command", Recorder)
    real = [os.path.realpath(a), os.path.realpath(b)]
    for argv, hashed in [
        ([str(recipe), "out", "--cuda"], real),
        ([str(recipe), "out", "--no-checksums"], []),
        ([str(recipe), "--help"], []),
        ([str(tmp_path / "nope.yml"), "out"], []),
        (["--out-shard-size", "1B", str(recipe), "out"], []),  # not first: the merge hashes
    ]:
        result = CliRunner().invoke(merge_cli.main, argv)
        assert result.exit_code == 0, result.output
        args, started, enabled = seen.pop()
        assert sorted(args) == sorted(argv), "every argument is handed on, none lost"
        assert started == hashed and enabled == ("--no-checksums" not in argv)
    recipe.write_text("merge_method: [")  # not YAML: the command itself will say so
    assert merge_cli.local_inputs(str(recipe)) == ([], False)


def test_waiting_for_the_hashes_shows_a_bar_of_bytes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(manifest_module, "_WINDOW", mmap.PAGESIZE)
    data = os.urandom(4 * mmap.PAGESIZE)
    folder = _folder(tmp_path, "m", {"model.safetensors": data})
    real = manifest_module.hash_file

    def slow(path, progress=None):  # still hashing when the merge is done
        import time

        time.sleep(0.6)
        return real(path, progress)

    monkeypatch.setattr(manifest_module, "hash_file", slow)
    manifest = Manifest()
    manifest.hash_inputs([folder])
    out = _folder(tmp_path, "out", {"model.safetensors": b"x"})
    manifest.hash_output(out)
    manifest.write(out, [("base_model", "m", str(folder))], progress=True, created_by="t")
    err = capsys.readouterr().err
    assert "checksums (SHA-256)" in err and "100%" in err  # every byte counted
    record = yaml.safe_load((out / manifest_module.MANIFEST_FILE).read_text())
    assert record["inputs"][0]["files"] == _reference(folder)
