"""Remembered input digests: reused only for the very same, settled, unchanged file."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from cpi_merge.io import digest_memo
from cpi_merge.io import manifest as manifest_module
from cpi_merge.io.digest_memo import DigestMemo
from cpi_merge.io.manifest import MANIFEST_FILE, Manifest

LATER = 10_000_000_000  # ns: "the hashing started 10 s after the file was written"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _remembered(tmp_path, data=b"x" * 1000):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    memo = DigestMemo(tmp_path / "memo.json")
    st = os.stat(path)
    digest = {"bytes": st.st_size, "sha256": _sha(path)}
    assert memo.remember(path, digest, st, time.time_ns() + LATER)
    memo.save()
    return path, memo, digest


def test_an_unchanged_file_is_remembered_across_memo_objects(tmp_path):
    path, memo, digest = _remembered(tmp_path)
    again = DigestMemo(memo.path).lookup(path, os.stat(path))
    assert again is not None and {k: again[k] for k in ("bytes", "sha256")} == digest
    assert again["remembered"].endswith("+00:00")


def test_same_size_same_mtime_new_bytes_is_not_remembered(tmp_path):
    path, memo, _ = _remembered(tmp_path)
    before = os.stat(path)
    time.sleep(0.05)  # past the kernel's timestamp granularity (a jiffy before Linux 6.13)
    path.write_bytes(b"y" * 1000)  # same size...
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and mtime put back
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if after.st_ctime_ns == before.st_ctime_ns:
        pytest.skip("this file system's ctime did not move in 50 ms")
    assert DigestMemo(memo.path).lookup(path, after) is None  # ctime moved


def test_a_file_replaced_under_the_same_name_is_not_remembered(tmp_path):
    path, memo, _ = _remembered(tmp_path)
    other = tmp_path / "other"
    other.write_bytes(path.read_bytes())
    os.replace(other, path)  # same bytes, another inode
    assert DigestMemo(memo.path).lookup(path, os.stat(path)) is None


def test_a_file_changed_just_before_its_hash_is_not_remembered(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    st = os.stat(path)
    memo = DigestMemo(tmp_path / "memo.json")
    assert not memo.remember(path, {"bytes": 3, "sha256": _sha(path)}, st, time.time_ns())
    path.write_bytes(b"abcd")  # changed while being hashed
    assert not memo.remember(path, {"bytes": 3, "sha256": "0" * 64}, st, time.time_ns() + LATER)


@pytest.mark.parametrize("content", ["not json", '{"format": "other", "files": {}}', "[1, 2]"])
def test_an_unreadable_memo_is_empty_and_gets_rewritten(tmp_path, content):
    memo_file = tmp_path / "memo.json"
    memo_file.write_text(content)
    path, memo, digest = _remembered(tmp_path)
    assert json.loads(memo_file.read_text())["format"] == digest_memo._FORMAT
    assert DigestMemo(memo_file).lookup(path, os.stat(path))["sha256"] == digest["sha256"]


def test_the_memo_keeps_only_the_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(digest_memo, "MAX_ENTRIES", 3)
    memo_file = tmp_path / "memo.json"
    for i in range(5):
        f = tmp_path / f"f{i}"
        f.write_bytes(bytes([i]))
        memo = DigestMemo(memo_file)
        later = time.time_ns() + (i + 1) * LATER
        assert memo.remember(f, {"bytes": 1, "sha256": _sha(f)}, os.stat(f), later)
        memo.save()
    kept = json.loads(memo_file.read_text())["files"]
    assert sorted(os.path.basename(k) for k in kept) == ["f2", "f3", "f4"]


def _inputs(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(70_000))
    (folder / "config.json").write_bytes(b"{}")
    return folder


def _manifest_run(folder, out, memo_file, *, hold=False):
    manifest = Manifest(memo=DigestMemo(memo_file))
    manifest.hash_inputs([folder], hold=hold)
    to_hash = manifest.bytes_to_hash([folder])
    out.mkdir()
    manifest.write(out, [("base", str(folder), str(folder))])
    return to_hash, json.loads((out / MANIFEST_FILE).read_text())["inputs"][0]["files"]


def test_a_second_manifest_takes_the_remembered_digests(tmp_path, monkeypatch):
    monkeypatch.setattr(digest_memo, "SETTLED_NS", 0)  # files written just now count as settled
    folder, memo_file = _inputs(tmp_path), tmp_path / "memo.json"
    reference = {p.name: _sha(p) for p in folder.iterdir()}
    to_hash, first = _manifest_run(folder, tmp_path / "o1", memo_file)
    assert to_hash == 70_002 and not any("remembered" in f for f in first.values())
    assert {n: f["sha256"] for n, f in first.items()} == reference

    monkeypatch.setattr(manifest_module, "hash_file", lambda *a: 1 / 0)  # nothing is read now
    to_hash, second = _manifest_run(folder, tmp_path / "o2", memo_file, hold=True)
    assert to_hash == 0 and all("remembered" in f for f in second.values())
    assert {n: f["sha256"] for n, f in second.items()} == reference
    monkeypatch.undo()

    # A rewritten file is hashed again (the new digest), the unchanged one still remembered.
    monkeypatch.setattr(digest_memo, "SETTLED_NS", 0)
    time.sleep(0.05)  # a new ctime, even with coarse timestamps
    (folder / "config.json").write_bytes(b"[]")
    to_hash, third = _manifest_run(folder, tmp_path / "o3", memo_file)
    assert to_hash == 2 and "remembered" not in third["config.json"]
    assert third["config.json"]["sha256"] == _sha(folder / "config.json")
    assert "remembered" in third["model.safetensors"]


def test_rehash_and_no_memo_hash_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(digest_memo, "SETTLED_NS", 0)
    folder, memo_file = _inputs(tmp_path), tmp_path / "memo.json"
    _manifest_run(folder, tmp_path / "o1", memo_file)
    manifest = Manifest()  # --rehash: no memo
    manifest.hash_inputs([folder])
    assert manifest.bytes_to_hash([folder]) == 70_002
    digests = manifest.input_digests(folder)
    assert not any("remembered" in f for f in digests.values())


def test_a_remembered_file_changed_during_the_merge_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(digest_memo, "SETTLED_NS", 0)
    folder, memo_file = _inputs(tmp_path), tmp_path / "memo.json"
    _manifest_run(folder, tmp_path / "o1", memo_file)
    manifest = Manifest(memo=DigestMemo(memo_file))
    manifest.hash_inputs([folder])
    weights = folder / "model.safetensors"
    before = os.stat(weights)
    time.sleep(0.05)  # past the kernel's timestamp granularity (a jiffy before Linux 6.13)
    weights.write_bytes(os.urandom(70_000))  # same size, mtime put back: only ctime tells
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    if os.stat(weights).st_ctime_ns == before.st_ctime_ns:
        pytest.skip("this file system's ctime did not move in 50 ms")
    got = manifest.input_digests(folder)
    assert got["model.safetensors"]["sha256"] == _sha(weights)
    assert "remembered" not in got["model.safetensors"]


def test_a_second_merge_of_the_same_inputs_takes_their_remembered_digests(
    tmp_path, tiny_family, monkeypatch
):
    from helpers.files import merged, write_recipe

    monkeypatch.setenv("CPI_MERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digest_memo, "SETTLED_NS", 0)
    base, tasks = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05, tau=0.05)

    def inputs(out):
        record = json.loads((out / MANIFEST_FILE).read_text())
        return {(i["role"], n): f for i in record["inputs"] for n, f in i["files"].items()}

    merged(recipe, tmp_path / "first")
    merged(recipe, tmp_path / "second")
    merged(recipe, tmp_path / "rehashed", rehash=True)
    first, second = inputs(tmp_path / "first"), inputs(tmp_path / "second")
    rehashed = inputs(tmp_path / "rehashed")
    assert not any("remembered" in f for f in first.values())
    assert second and all("remembered" in f for f in second.values())
    assert not any("remembered" in f for f in rehashed.values())
    strip = {k: (f["bytes"], f["sha256"]) for k, f in second.items()}
    assert strip == {k: (f["bytes"], f["sha256"]) for k, f in first.items()}
    assert strip == {k: (f["bytes"], f["sha256"]) for k, f in rehashed.items()}
    # the merged models themselves are the same
    assert _sha(tmp_path / "first" / "model.safetensors") == _sha(
        tmp_path / "second" / "model.safetensors"
    )


def test_a_memo_writable_by_others_is_not_believed(tmp_path):
    path, memo, _ = _remembered(tmp_path)
    os.chmod(memo.path, 0o666)
    assert DigestMemo(memo.path).lookup(path, os.stat(path)) is None
    os.chmod(memo.path, 0o600)
    assert DigestMemo(memo.path).lookup(path, os.stat(path)) is not None


def test_bad_entries_are_dropped_and_a_relative_memo_path_is_not_used(tmp_path, monkeypatch):
    path, memo, digest = _remembered(tmp_path)
    record = json.loads(memo.path.read_text())
    record["files"]["/x"] = "not a dict"
    record["files"]["/y"] = {"status": [], "sha256": "0" * 64}  # no hashed_at
    memo.path.write_text(json.dumps(record))
    again = DigestMemo(memo.path)
    assert again.lookup(path, os.stat(path))["sha256"] == digest["sha256"]
    assert set(again._load()) == {os.path.realpath(path)}
    monkeypatch.chdir(tmp_path)
    relative = DigestMemo("memo_here.json")
    relative.remember(path, digest, os.stat(path), time.time_ns() + LATER)
    relative.save()
    assert not (tmp_path / "memo_here.json").exists()
