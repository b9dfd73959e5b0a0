"""How the cost of cpi-merge grows with the model: one table over several sizes.

``python -m benchmarks.speed --sizes 0.1,0.5,2`` makes, per size, a synthetic Llama family
(base + N fine-tunes, bf16, the same generator as the single-size run), then times three
commands as separate processes, interleaved over ``--repeat`` rounds after a warm-up
read: mergekit ``task_arithmetic`` (the baseline), ``cpi-analyze`` (the default
strategy), ``cpi-merge`` end to end as a user re-running a merge on the same checkpoints
runs it (the inputs' SHA-256 remembered from the warm-up merge,
:mod:`cpi_merge.io.digest_memo`), and ``cpi-merge --rehash``: the first merge of new
checkpoints, every input hashed. It prints per size the medians, their ratio to
task_arithmetic and peak RSS, so a reader sees how each grows. The remembered digests
live in the family's folder (``CPI_MERGE_CACHE_DIR``), not the user's cache.

``--cache-limit GiB`` runs every command inside a cgroup-v1 memory group with that limit:
the page cache the command may hold is then the limit minus its own memory, as for a user
whose checkpoints do not fit in RAM. Missing cgroup support (or no permission) skips the
capped run with a message; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.synthetic import LlamaShape, TaskSpec, make_family
from benchmarks.tree_memory import TreeMemory

BIN = Path(sys.executable).parent
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")

SIZES: dict[str, LlamaShape] = {
    # hidden/intermediate/layers of Llama proportions, Llama-2 vocabulary; num_parameters:
    "0.1": LlamaShape(32000, 512, 2048, 16, 8, 8),  # 0.10B
    "0.5": LlamaShape(32000, 1024, 4096, 24, 16, 16),  # 0.47B (the single-size default)
    "2": LlamaShape(32000, 2048, 8192, 28, 16, 16),  # 2.01B
}


class MemoryGroup:
    """A cgroup-v1 memory group that commands are started in (limit in bytes)."""

    def __init__(self, limit_bytes: int, name: str = "cpi_bench"):
        self.path = CGROUP_ROOT / name
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.limit_bytes = limit_bytes

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why no memory group can be made here, or None when one can."""
        if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
            return f"no cgroup-v1 memory controller at {CGROUP_ROOT}"
        if not os.access(CGROUP_ROOT, os.W_OK):
            return f"no permission to create a memory group under {CGROUP_ROOT}"
        return None

    def enter(self) -> None:
        """Move the calling process into the group (called in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def drop_cache(self) -> None:
        """Free the page cache charged to the group, so every run starts from disk."""
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass

    def remove(self) -> None:
        """Delete the group (it must be empty of processes)."""
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_measured(
    cmd: list[str], cwd: Path, group: MemoryGroup | None = None, env: dict | None = None
) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MiB of its process tree).

    The larger of ``wait4``'s peak and the sampled sum over the tree (:mod:`benchmarks.tree_memory`).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=group.enter if group else None,  # noqa: PLW1509 - only writes one file
    )
    tree = TreeMemory(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    tree_mib = tree.stop()
    code = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{err[-3000:]}")
    return wall, max(usage.ru_maxrss / 1024, tree_mib)


OUTPUTS = {
    "task_arithmetic": "task_arithmetic",
    "cpi-analyze": "analysis",
    "cpi-merge": "cpi",
    "cpi-merge --rehash": "cpi_rehash",
}
"""Each command's output folder under the family's ``out``."""


def _family(workdir: Path, size: str, tasks: int) -> tuple[Path, Path, list[Path]]:
    shape = SIZES[size]
    work = workdir / f"scale_{size}b_{tasks}t"
    marker = work / "ready"
    if not marker.exists():
        print(
            f"making base + {tasks} tasks of {shape.num_parameters / 1e9:.2f}B parameters "
            f"in {work} (resumable)",
            flush=True,
        )
        specs = [
            TaskSpec(hot_layers=[i % shape.layers], shared=0.8, seed=i + 1) for i in range(tasks)
        ]
        make_family(
            work, shape, specs, dtype=torch.bfloat16, shard_bytes=2_000_000_000, resume=True
        )
        marker.write_text("ok")
    return work, work / "base", [work / f"task_{i}" for i in range(tasks)]


def measure_size(
    workdir: Path,
    size: str,
    tasks: int,
    core_fraction: float,
    repeat: int,
    group: MemoryGroup | None = None,
) -> dict:
    """Time task_arithmetic, cpi-analyze and cpi-merge on one size; return the samples."""
    from benchmarks.speed import write_recipes

    work, base, task_dirs = _family(workdir, size, tasks)
    recipes = write_recipes(work, base, task_dirs, core_fraction)
    out = work / "out"

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    commands: dict[str, Callable[[], list[str]]] = {
        "task_arithmetic": lambda: [
            str(BIN / "mergekit-yaml"),
            str(recipes["task_arithmetic"]),
            str(fresh(out / OUTPUTS["task_arithmetic"])),
            "--no-copy-tokenizer",
            "--quiet",
        ],
        "cpi-analyze": lambda: [
            str(BIN / "cpi-analyze"),
            str(recipes["cpi"]),
            "--out",
            str(fresh(out / OUTPUTS["cpi-analyze"])),
            "-q",
            "--no-plots",
        ],
        **{
            name: lambda name=name: [
                str(BIN / "cpi-merge"),
                str(recipes["cpi"]),
                str(fresh(out / OUTPUTS[name])),
                "--quiet",
                *name.split()[1:],  # "--rehash"
            ]
            for name in ("cpi-merge", "cpi-merge --rehash")
        },
    }
    memo = work / "digest_memo"
    shutil.rmtree(memo, ignore_errors=True)
    env = {**os.environ, "CPI_MERGE_CACHE_DIR": str(memo)}
    # Warm-up: the page cache (uncapped runs), and the inputs' digests for "cpi-merge".
    warm_up = ["cpi-merge"] if group is not None else ["cpi-analyze", "cpi-merge"]
    for name in warm_up:
        run_measured(commands[name](), work, group, env)
        fresh(out / OUTPUTS[name])
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for r in range(repeat):
        for name, cmd in commands.items():
            if group is not None:
                group.drop_cache()
            samples[name].append(run_measured(cmd(), work, group, env))
            # Its output goes at once: GBs of written pages would otherwise stay in the
            # page cache and push the inputs out for the next command (at 2B inputs and
            # outputs exceed this machine's cache), so every command starts alike.
            fresh(out / OUTPUTS[name])
            wall_s, rss_mib = samples[name][-1]
            print(
                f"{size}B round {r + 1}: {name:16s} {wall_s:7.2f} s  {rss_mib:8.0f} MiB",
                flush=True,
            )
    input_bytes = sum(f.stat().st_size for d in (base, *task_dirs) for f in d.glob("*.safetensors"))
    return {
        "size": size,
        "parameters": SIZES[size].num_parameters,
        "input_bytes": input_bytes,
        "samples": samples,
    }


def print_table(results: Sequence[dict], repeat: int, group: MemoryGroup | None) -> None:
    """The scaling table: medians, ratios to task_arithmetic, peak RSS."""
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"median of {repeat} interleaved rounds"
        + (
            f"; every command in a {group.limit_bytes / 2**30:.1f} GiB memory group"
            if group
            else ""
        )
    )
    head = (
        "| size | inputs | task_arithmetic s | cpi-analyze s | cpi-merge s | ratio "
        "| cpi-merge --rehash s | ratio | RSS TA MiB | RSS analyze MiB | RSS cpi-merge MiB "
        "| RSS ratio |"
    )
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        s = res["samples"]
        wall = {n: statistics.median(x[0] for x in v) for n, v in s.items()}
        rss = {n: max(x[1] for x in v) for n, v in s.items()}
        ta = wall["task_arithmetic"]
        rehash = wall.get("cpi-merge --rehash", float("nan"))
        merge_rss = max(rss["cpi-merge"], rss.get("cpi-merge --rehash", 0.0))
        print(
            f"| {res['parameters'] / 1e9:.2f}B | {res['input_bytes'] / 2**30:.1f} GiB "
            f"| {ta:.2f} | {wall['cpi-analyze']:.2f} "
            f"| {wall['cpi-merge']:.2f} | **{wall['cpi-merge'] / ta:.2f}×** "
            f"| {rehash:.2f} | **{rehash / ta:.2f}×** "
            f"| {rss['task_arithmetic']:.0f} | {rss['cpi-analyze']:.0f} | {merge_rss:.0f} "
            f"| {merge_rss / rss['task_arithmetic']:.2f}× |"
        )


def run_sizes(
    sizes: Sequence[str],
    workdir: Path,
    tasks: int,
    core_fraction: float,
    repeat: int,
    cache_limit_gib: float | None,
    json_path: Path | None,
) -> None:
    """The ``--sizes`` mode of :mod:`benchmarks.speed`."""
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; allowed: {', '.join(SIZES)} (billions)")
    group = None
    if cache_limit_gib is not None:
        reason = MemoryGroup.unavailable_reason()
        if reason:
            print(f"--cache-limit skipped: {reason}", flush=True)
            return
        group = MemoryGroup(int(cache_limit_gib * 2**30))
    try:
        results = [
            measure_size(workdir.resolve(), s, tasks, core_fraction, repeat, group) for s in sizes
        ]
    finally:
        if group is not None:
            group.remove()
    print_table(results, repeat, group)
    if json_path:
        rows = [dataclasses.asdict(SIZES[r["size"]]) | r for r in results]
        json_path.write_text(json.dumps(rows, indent=1))
