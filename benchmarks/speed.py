"""Speed and peak memory of cpi-analyze and cpi-merge against baselines in the same run.

Makes a synthetic Llama-shaped family on the fly (base + N fine-tunes, bf16, sharded),
then times each command as a separate process (peak RSS from ``wait4``), interleaved
over ``--repeat`` rounds after a warm-up read so that every command sees a warm page
cache. Prints medians and ratios against:

  (a) a plain Python read of every tensor of the same files (safetensors, copied out),
  (b) ``mergekit-yaml`` with ``task_arithmetic`` on the same checkpoints,

and also times mergekit ``ties`` (density 0.01, once: it is slow) and ``slerp``
(base + 1 task). ``cpi-merge (merge only)`` runs with every ``core_threshold`` given in
the recipe, so it skips the analysis.

Usage:
    python -m benchmarks.speed                    # ~0.47B parameters per model (default)
    python -m benchmarks.speed --layers 4         # a quick, smaller run
    python -m benchmarks.speed --sizes 0.1,0.5,2  # how cost grows (benchmarks/scaling.py)
    python -m benchmarks.speed --sizes 2 --cache-limit 10   # page cache capped (cgroup)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.synthetic import BENCH_SHAPE, TaskSpec, make_family
from benchmarks.tree_memory import TreeMemory

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

# safetensors' get_tensor maps the file without reading it: clone() makes it a real read.
READ_ALL = """
import sys, safetensors
from pathlib import Path
n = 0
for folder in sys.argv[1:]:
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safetensors.safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n += st.get_tensor(k).clone().numel()
print(n)
"""


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MiB of its process tree).

    The larger of ``wait4``'s peak and the sampled sum over the tree (:mod:`benchmarks.tree_memory`).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree = TreeMemory(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    tree_mib = tree.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, max(usage.ru_maxrss / 1024, tree_mib)


def write_recipes(work: Path, base: Path, tasks: list[Path], core_fraction: float) -> dict:
    """Write every recipe the benchmark runs; return {name: path}."""
    cpi = {
        "merge_method": "cpi",
        "base_model": str(base),
        "models": [{"model": str(t)} for t in tasks],
        "parameters": {"core_fraction": core_fraction, "tau": 0.1},
        "dtype": "bfloat16",
    }
    weighted = [{"model": str(t), "parameters": {"weight": 1.0}} for t in tasks]
    recipes = {
        "cpi": cpi,
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": weighted,
            "dtype": "bfloat16",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": str(base),
            "dtype": "bfloat16",
            "models": [
                {"model": str(t), "parameters": {"weight": 1.0, "density": 0.01}} for t in tasks
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(base),
            "dtype": "bfloat16",
            "models": [{"model": str(base)}, {"model": str(tasks[0])}],
            "parameters": {"t": 0.5},
        },
    }
    paths = {}
    for name, doc in recipes.items():
        paths[name] = work / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


def write_given_thresholds(recipe: Path, plan_file: Path, out: Path) -> Path:
    """A copy of the cpi recipe with every task's core_threshold taken from a plan."""
    doc = yaml.safe_load(recipe.read_text())
    thresholds = {
        t["name"]: t["core_threshold"] for t in json.loads(plan_file.read_text())["tasks"]
    }
    for m in doc["models"]:
        m["parameters"] = {"core_threshold": thresholds[Path(m["model"]).name]}
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=BENCH_SHAPE.layers)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--core-fraction", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench_workdir"))
    parser.add_argument("--json", type=Path, help="Also write the results here as JSON.")
    parser.add_argument(
        "--only", help="Comma-separated substrings: time only matching commands (baselines kept)."
    )
    parser.add_argument(
        "--sizes",
        help="Comma-separated model sizes in billions (0.1, 0.5, 2): the scaling table of "
        "task_arithmetic, cpi-analyze and cpi-merge instead (benchmarks/scaling.py).",
    )
    parser.add_argument(
        "--cache-limit",
        type=float,
        metavar="GIB",
        help="With --sizes: run every command in a memory cgroup of this many GiB.",
    )
    args = parser.parse_args()
    if args.sizes:
        from benchmarks.scaling import run_sizes

        run_sizes(
            [s.strip() for s in args.sizes.split(",")],
            args.workdir,
            args.tasks,
            args.core_fraction,
            args.repeat,
            args.cache_limit,
            args.json,
        )
        return
    if args.cache_limit is not None:
        parser.error("--cache-limit needs --sizes")

    shape = dataclasses.replace(BENCH_SHAPE, layers=args.layers)
    work = args.workdir.resolve() / f"llama_{args.layers}l_{args.tasks}t"
    marker = work / "ready"
    if not marker.exists():
        shutil.rmtree(work, ignore_errors=True)
        print(f"making base + {args.tasks} tasks, {shape.num_parameters / 1e9:.3f}B params each")
        specs = [
            TaskSpec(hot_layers=[i % args.layers], shared=0.8, seed=i + 1)
            for i in range(args.tasks)
        ]
        make_family(work, shape, specs, dtype=torch.bfloat16, shard_bytes=400_000_000)
        marker.write_text("ok")
    base, tasks = work / "base", [work / f"task_{i}" for i in range(args.tasks)]
    recipes = write_recipes(work, base, tasks, args.core_fraction)
    out = work / "out"

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    def mergekit(name: str) -> list[str]:
        return [
            str(BIN / "mergekit-yaml"),
            str(recipes[name]),
            str(fresh(out / name)),
            "--no-copy-tokenizer",
            "--quiet",
        ]

    def cpi(*extra: str, recipe: Path = recipes["cpi"], folder: str = "cpi") -> list[str]:
        return [str(BIN / "cpi-merge"), str(recipe), str(fresh(out / folder)), "--quiet", *extra]

    def analyze(strategy: str) -> list[str]:
        return [
            str(BIN / "cpi-analyze"),
            str(recipes["cpi"]),
            "--out",
            str(fresh(out / f"analysis_{strategy}")),
            "--strategy",
            strategy,
            "-q",
        ]

    run_measured(analyze("buffer"), work)  # warm the page cache, and get thresholds
    given = write_given_thresholds(
        recipes["cpi"], out / "analysis_buffer" / "cpi_plan.json", work / "cpi_given.yml"
    )
    commands = {
        "plain read": lambda: [sys.executable, "-c", READ_ALL, str(base), *map(str, tasks)],
        "mergekit task_arithmetic": lambda: mergekit("task_arithmetic"),
        "mergekit slerp (1 task)": lambda: mergekit("slerp"),
        "mergekit ties (d=0.01)": lambda: mergekit("ties"),
        "cpi-analyze (buffer)": lambda: analyze("buffer"),
        "cpi-analyze (histogram)": lambda: analyze("histogram"),
        "cpi-merge (end to end)": lambda: cpi(),
        "cpi-merge --no-checksums": lambda: cpi("--no-checksums"),
        "cpi-merge (merge only)": lambda: cpi("--no-checksums", recipe=given, folder="given"),
    }
    if args.only:
        keep = [k.strip() for k in args.only.split(",")] + ["plain read", "task_arithmetic"]
        commands = {n: c for n, c in commands.items() if any(k in n for k in keep)}
    once = {"mergekit ties (d=0.01)"}  # minutes per run: one sample is enough
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for r in range(args.repeat):
        for name, cmd in commands.items():
            if name in once and r > 0:
                continue
            samples[name].append(run_measured(cmd(), work))
            wall_s, rss_mib = samples[name][-1]
            print(f"round {r + 1}: {name:28s} {wall_s:7.2f} s  {rss_mib:8.0f} MiB", flush=True)

    wall = {n: statistics.median(s[0] for s in v) for n, v in samples.items()}
    rss = {n: max(s[1] for s in v) for n, v in samples.items()}
    ta = "mergekit task_arithmetic"
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{shape.num_parameters / 1e9:.3f}B params x {1 + args.tasks} bf16 checkpoints, "
        f"p = {args.core_fraction}, median of {args.repeat}"
    )
    print("(mergekit ties: a single sample; others: median of --repeat)")
    head = ["wall s", "x plain read", "x task_arith", "peak RSS MiB"]
    print(f"{'command':28s} {head[0]:>8s} " + " ".join(f"{h:>13s}" for h in head[1:]))
    for name in commands:
        print(
            f"{name:28s} {wall[name]:8.2f} {wall[name] / wall['plain read']:13.2f} "
            f"{wall[name] / wall[ta]:13.2f} {rss[name]:13.0f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"wall_s": wall, "peak_rss_mib": rss, "samples": samples}, indent=1)
        )


if __name__ == "__main__":
    main()
