"""Input hashes computed behind the analysis's own read: whole-file SHA-256, never ahead."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import sys
import threading
import time
from concurrent.futures import CancelledError
from contextlib import nullcontext

import pytest
import torch

from cpi_merge.io import follow_hash
from cpi_merge.io import manifest as manifest_module
from cpi_merge.io.checkpoints import Checkpoint, open_checkpoint
from cpi_merge.io.follow_hash import FollowingHasher, ReleasedRanges, safetensors_spans
from cpi_merge.io.manifest import HASHED_SUFFIXES as HASHED
from cpi_merge.io.manifest import Manifest, _stamps

from helpers.files import merged, write_model, write_recipe
from helpers.hf_models import make_hf_family

PAGE = mmap.PAGESIZE


@pytest.fixture(autouse=True)
def inputs_larger_than_the_cache(monkeypatch):
    """The tiny test checkpoints stand for ones that do not fit in the page cache."""
    monkeypatch.setattr(manifest_module, "page_cache_room", lambda: 1)
    monkeypatch.setattr(manifest_module, "resident_share", lambda paths: 0.0)


def _digest(path):
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("seed", range(6))
def test_released_ranges_match_a_bitmap(seed):
    rng = random.Random(seed)
    size = rng.randint(1, 300)
    ranges, bitmap = ReleasedRanges(size), [False] * size
    for _ in range(rng.randint(1, 30)):
        start = rng.randint(-5, size + 5)
        stop = start + rng.randint(-2, 40)
        ranges.add(start, stop)
        for i in range(max(0, start), min(stop, size)):
            bitmap[i] = True
        merged_ranges = ranges.ranges
        assert all(a < b for a, b in merged_ranges)
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(merged_ranges, merged_ranges[1:]))
        assert [i for a, b in merged_ranges for i in range(a, b)] == [
            i for i, on in enumerate(bitmap) if on
        ]
        for position in range(size + 1):
            for gap in (0, 3):
                reach = position  # brute force: walk on, through gaps of at most `gap`
                for i in range(position, size):
                    if bitmap[i] and i - reach <= gap:
                        reach = i + 1
                assert ranges.reach(position, gap) == reach


def _tensor_file(tmp_path, name="m", n=12):
    """A folder with a safetensors file of ``n`` tensors of several pages each, and a config."""
    tensors = {f"t.{i:02d}": torch.randn(PAGE // 2 * (1 + i % 3)) for i in range(n)}
    tensors["step"] = torch.tensor([7], dtype=torch.int64)  # not read by the analysis
    folder = write_model(tmp_path / name, tensors)
    return folder, next(folder.glob("*.safetensors"))


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(follow_hash, "_WINDOW", PAGE)  # many windows per file
    monkeypatch.setattr(follow_hash, "_GAP", 0)  # never read an unreleased byte


def _start(folder, hold=True):
    hasher = FollowingHasher({str(folder): _stamps(folder)}, hold=hold)
    thread = threading.Thread(target=hasher.run, daemon=True)
    thread.start()
    return hasher, thread


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_following_digests_equal_hashlib_and_never_read_ahead(tmp_path, small_windows, order):
    folder, path = _tensor_file(tmp_path)
    end, spans = safetensors_spans(path)
    read = [spans[n] for n in sorted(spans) if n != "step"]
    if order == "reversed":
        read.reverse()
    elif order == "shuffled":
        random.Random(0).shuffle(read)
    hasher, thread = _start(folder)
    state = hasher._files[(str(folder), path.name)]
    hasher.follow({(str(folder), path.name): read})
    bitmap = ReleasedRanges(state.size)  # what the reader has released, as the test sees it
    bitmap.add(0, state.size)
    for start, stop in read:
        bitmap = _minus(bitmap, start, stop)
    for start, stop in read:
        hasher.release(str(folder), path.name, start, stop)
        bitmap.add(start, stop)
        _until(lambda: state.hashed == bitmap.reach(0, 0))
        time.sleep(0.01)
        assert state.hashed == bitmap.reach(0, 0), "no further than the released prefix"
    thread.join(10)
    assert hasher.futures[str(folder)].result() == {
        p.name: _digest(p) for p in sorted(folder.iterdir())
    }


def _minus(ranges, start, stop):
    kept = ReleasedRanges(ranges.size)
    for a, b in ranges.ranges:
        kept.add(a, min(b, start))
        kept.add(max(a, stop), b)
    return kept


def test_bytes_the_reader_will_not_read_are_hashed_at_once(tmp_path, small_windows):
    folder, path = _tensor_file(tmp_path)
    end, spans = safetensors_spans(path)
    read = [s for n, s in spans.items() if n != "step"]
    first = min(read)
    hasher, thread = _start(folder)
    key = (str(folder), path.name)
    time.sleep(0.05)
    assert hasher._files[key].hashed == 0, "held: nothing hashed before the analysis starts"
    assert hasher._files[(str(folder), "config.json")].done, "a config is hashed at once"
    hasher.follow({key: read})
    _until(lambda: hasher._files[key].hashed == first[0])  # the header, up to the data read
    assert first[0] >= end
    hasher.release_all()  # the analysis ended (or failed) part way
    thread.join(10)
    assert hasher.futures[str(folder)].result()[path.name] == _digest(path)


def test_cancel_ends_a_held_hash_without_a_digest(tmp_path):
    folder, _ = _tensor_file(tmp_path)
    hasher, thread = _start(folder)
    hasher.cancel()
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(CancelledError):
        hasher.futures[str(folder)].result()


def test_a_file_removed_before_hashing_fails_only_its_folder(tmp_path):
    a, path = _tensor_file(tmp_path, "a")
    b, _ = _tensor_file(tmp_path, "b")
    hasher = FollowingHasher({str(a): _stamps(a), str(b): _stamps(b)}, hold=False)
    path.unlink()
    hasher.run()
    with pytest.raises(OSError):
        hasher.futures[str(a)].result()
    assert hasher.futures[str(b)].result() == {p.name: _digest(p) for p in sorted(b.iterdir())}


def _model(tmp_path, name, shard_bytes=20_000):
    """A model whose float32 norms are stored before its bfloat16 weights (not name order)."""
    gen = torch.Generator().manual_seed(len(name))
    tensors = {}
    for i in range(6):
        tensors[f"layers.{i}.norm"] = torch.randn(64, generator=gen)
        tensors[f"layers.{i}.weight"] = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    return write_model(tmp_path / name, tensors, shard_bytes=shard_bytes)


@pytest.mark.parametrize("ending", ["finished", "error", "interrupt"])
def test_manifest_following_checkpoints(tmp_path, monkeypatch, ending):
    monkeypatch.setattr(follow_hash, "_WINDOW", PAGE)
    folders = [_model(tmp_path, "base"), _model(tmp_path, "task")]
    ckpts = [open_checkpoint(str(f), role=f.name) for f in folders]
    names = [t.name for t in ckpts[0].float_tensors]
    manifest = Manifest()
    manifest.hash_inputs(folders, hold=True)
    failure = {"error": ValueError("analysis failed"), "interrupt": KeyboardInterrupt()}
    expect_raise = pytest.raises(type(failure[ending])) if ending in failure else nullcontext()
    with expect_raise, manifest.following(ckpts, names):
        assert all(c.on_read is not None for c in ckpts)
        for i, name in enumerate(names):
            if ending in failure and i == len(names) // 2:
                raise failure[ending]
            for c in ckpts:
                c.mark_read(name)
    assert all(c.on_read is None for c in ckpts)
    for folder in folders:
        assert manifest.input_digests(folder) == {
            p.name: _digest(p) for p in sorted(folder.iterdir())
        }


def test_manifest_cancel_while_held_ends_the_thread_and_later_jobs_run(tmp_path):
    folder, _ = _tensor_file(tmp_path)
    manifest = Manifest()
    manifest.hash_inputs([folder], hold=True)
    job = manifest._inputs[str(folder.resolve())][1]
    manifest.cancel()
    with pytest.raises(CancelledError):
        job.result(timeout=10)
    out = write_model(tmp_path / "out", {"x": torch.ones(3)})
    manifest.hash_output(out)
    assert manifest._output.result(timeout=10) == {
        p.name: _digest(p) for p in sorted(out.iterdir())
    }


def test_held_inputs_no_reader_covers_are_hashed_at_once(tmp_path):
    read, _ = _tensor_file(tmp_path, "read")
    other, _ = _tensor_file(tmp_path, "adapter")  # e.g. a LoRA adapter: never streamed
    (other / "pytorch_model.bin").write_bytes(b"pickle")
    manifest = Manifest()
    manifest.hash_inputs([read, other], hold=True)
    ckpt = open_checkpoint(str(read), role="base_model")
    with manifest.following([ckpt], [t.name for t in ckpt.float_tensors]):
        digests = manifest._inputs[str(other.resolve())][1].result(timeout=10)
        assert not manifest._inputs[str(read.resolve())][1].done()
    assert digests == {p.name: _digest(p) for p in sorted(other.iterdir())}
    assert manifest.input_digests(read) == {p.name: _digest(p) for p in sorted(read.iterdir())}


def test_the_analysis_reports_every_tensor_it_reads(tmp_path, monkeypatch):
    base, tasks = make_hf_family(tmp_path, "llama", n_tasks=2)
    reported: dict[str, list[str]] = {}
    real = Checkpoint.mark_read

    def recording(self, name):
        if self.on_read is not None:  # while the manifest follows
            reported.setdefault(os.path.realpath(self.path), []).append(name)
        real(self, name)

    monkeypatch.setattr(Checkpoint, "mark_read", recording)
    recipe = write_recipe(tmp_path / "r.yml", base, tasks, core_fraction=0.05)
    merged(recipe, tmp_path / "out")
    stream = [t.name for t in open_checkpoint(str(base), role="base").float_tensors]
    assert sorted(reported) == sorted(os.path.realpath(f) for f in [base, *tasks])
    assert all(names[: len(stream)] == stream for names in reported.values())
    record = json.loads((tmp_path / "out" / "cpi_manifest.json").read_text())
    for entry, folder in zip(record["inputs"], [base, *tasks], strict=True):
        assert entry["files"] == {
            p.name: _digest(p) for p in sorted(folder.iterdir()) if p.name.endswith(HASHED)
        }


def test_small_tensors_stored_out_of_stream_order_do_not_stall_the_hash(tmp_path):
    folder = _model(tmp_path, "base", shard_bytes=None)
    ckpt = open_checkpoint(str(folder), role="base_model")
    names = [t.name for t in ckpt.float_tensors]  # the stream: norm 0, weight 0, norm 1...
    _, spans = safetensors_spans(folder / "model.safetensors")
    read, unread = names[:2], names[2:]
    last = max(spans[n][1] for n in read)
    assert any(spans[n][1] <= last for n in unread), "stored out of stream order"
    manifest = Manifest()
    manifest.hash_inputs([folder], hold=True)
    hasher = manifest._hashers[str(folder.resolve())]
    state = hasher._files[(str(folder.resolve()), "model.safetensors")]
    with manifest.following([ckpt], names):
        for name in read:
            ckpt.mark_read(name)
        _until(lambda: state.hashed >= last)  # read through the small unreleased norms
    assert manifest.input_digests(folder) == {p.name: _digest(p) for p in sorted(folder.iterdir())}


def test_folders_with_nothing_to_hash_are_done(tmp_path):
    empty, some = tmp_path / "empty", tmp_path / "some"
    empty.mkdir()
    some.mkdir()
    (some / "empty.txt").write_bytes(b"")
    hasher = FollowingHasher({str(empty): [], str(some): _stamps(some)}, hold=True)
    hasher.run()
    assert hasher.futures[str(empty)].result() == {}
    assert hasher.futures[str(some)].result() == {"empty.txt": _digest(some / "empty.txt")}


def test_the_command_line_holds_the_checkpoints_only_when_the_merge_analyses(tmp_path):
    from cpi_merge.cli.merge import local_inputs

    base, task = tmp_path / "b", tmp_path / "t"
    base.mkdir()
    task.mkdir()
    for threshold, analysed in [(None, True), (0.5, False)]:
        params = {} if threshold is None else {"core_threshold": threshold}
        recipe = write_recipe(tmp_path / "r.yml", base, [(task, params)])
        assert local_inputs(str(recipe)) == ([str(base), str(task)], analysed)


def test_checkpoints_that_fit_in_the_cache_are_hashed_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "page_cache_room", lambda: 1 << 40)
    folder, _ = _tensor_file(tmp_path)
    manifest = Manifest()
    manifest.hash_inputs([folder], hold=True)  # never released, never followed
    assert manifest.input_digests(folder) == {p.name: _digest(p) for p in sorted(folder.iterdir())}


def test_hand_over_moves_the_hashing_to_a_new_thread_mid_file(tmp_path, small_windows):
    folder, path = _tensor_file(tmp_path)
    hasher, first = _start(folder)
    state = hasher._files[(str(folder), path.name)]
    hasher.release(str(folder), path.name, 0, 3 * PAGE)
    _until(lambda: state.hashed == 3 * PAGE)  # the first thread now waits for releases
    second = hasher.hand_over()
    first.join(10)
    assert not first.is_alive(), "the first thread leaves once another took over"
    assert state.hashed == 3 * PAGE and second.is_alive()
    hasher.release_all()
    second.join(10)
    assert hasher.futures[str(folder)].result() == {
        p.name: _digest(p) for p in sorted(folder.iterdir())
    }
    assert hasher.hand_over() is None  # nothing left


def test_a_hasher_whose_first_thread_never_ran_is_hashed_by_the_hand_over(tmp_path):
    folder, _ = _tensor_file(tmp_path)
    hasher = FollowingHasher({str(folder): _stamps(folder)}, hold=False)
    hasher.hand_over().join(10)
    hasher.run()  # the starved thread comes at last: it must not take the hashing back
    assert hasher.futures[str(folder)].result() == {
        p.name: _digest(p) for p in sorted(folder.iterdir())
    }


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_unheld_inputs_are_hashed_at_low_priority_and_a_starved_hash_still_ends(
    tmp_path, monkeypatch
):
    seen, mine = [], os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def nice_of_this_thread():
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    # in a thread of its own: a thread cannot take its priority back
    niced = threading.Thread(target=manifest_module._at_low_priority, args=(nice_of_this_thread,))
    niced.start()
    niced.join(10)
    assert seen == [max(manifest_module.LOW_PRIORITY, mine)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # unchanged
    folder, _ = _tensor_file(tmp_path)
    monkeypatch.setattr(manifest_module, "_at_low_priority", lambda job: None)  # starved
    manifest = Manifest()
    manifest.hash_inputs([folder])
    assert manifest.yields_cpu([folder]) and not manifest.yields_cpu([tmp_path / "other"])
    out = tmp_path / "out"
    out.mkdir()
    writer = threading.Thread(  # the hand-over hashes it
        target=manifest.write, args=(out, [("base", str(folder), str(folder))]), daemon=True
    )
    writer.start()
    writer.join(30)
    assert not writer.is_alive(), "the manifest waits forever for a starved hash"
    record = json.loads((out / "cpi_manifest.json").read_text())
    assert record["inputs"][0]["files"] == {p.name: _digest(p) for p in sorted(folder.iterdir())}


def test_held_inputs_do_not_yield(tmp_path, monkeypatch):
    folder, _ = _tensor_file(tmp_path)
    monkeypatch.setattr(manifest_module, "inputs_fit_in_cache", lambda *a: False)
    manifest = Manifest()
    manifest.hash_inputs([folder], hold=True)
    try:
        assert not manifest.yields_cpu([folder])
    finally:
        manifest.cancel()
