"""Speed and peak memory of cpi-analyze against baselines measured in the same run.

Makes a synthetic Llama-shaped family on the fly (base + N fine-tunes, bf16, sharded),
then times each command as a separate process (peak RSS from ``wait4``), interleaved
over ``--repeat`` rounds after a warm-up read so that every command sees a warm page
cache. Prints medians and ratios against:

  (a) a plain Python read of every tensor of the same files (safetensors ``get_tensor``),
  (b) ``mergekit-yaml`` with ``task_arithmetic`` on the same checkpoints.

Usage:
    python benchmarks/speed.py                    # ~0.47B parameters per model (default)
    python benchmarks/speed.py --layers 4         # a quick, smaller run
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

from cpi_merge.synthetic import BENCH_SHAPE, TaskSpec, make_family

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
    """Run a command; return (wall seconds, peak RSS in MiB of that process tree's leader)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def write_recipes(work: Path, base: Path, tasks: list[Path], core_fraction: float) -> dict:
    models = "".join(f"  - model: {t}\n" for t in tasks)
    cpi = work / "cpi.yml"
    cpi.write_text(
        f"merge_method: cpi\nbase_model: {base}\nmodels:\n{models}"
        f"parameters:\n  core_fraction: {core_fraction}\n  tau: 0.1\ndtype: bfloat16\n"
    )
    ta_models = "".join(f"  - model: {t}\n    parameters: {{weight: 1.0}}\n" for t in tasks)
    ta = work / "task_arithmetic.yml"
    ta.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{ta_models}dtype: bfloat16\n"
    )
    return {"cpi": cpi, "task_arithmetic": ta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=BENCH_SHAPE.layers)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--core-fraction", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench_workdir"))
    parser.add_argument("--json", type=Path, help="Also write the results here as JSON.")
    args = parser.parse_args()

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

    commands = {
        "plain read": lambda: [sys.executable, "-c", READ_ALL, str(base), *map(str, tasks)],
        "mergekit task_arithmetic": lambda: [
            str(BIN / "mergekit-yaml"),
            str(recipes["task_arithmetic"]),
            str(fresh(out / "ta")),
            "--no-copy-tokenizer",
            "--quiet",
        ],
        "cpi-analyze (buffer)": lambda: [
            str(BIN / "cpi-analyze"),
            str(recipes["cpi"]),
            "--out",
            str(fresh(out / "buf")),
            "--strategy",
            "buffer",
            "-q",
        ],
        "cpi-analyze (histogram)": lambda: [
            str(BIN / "cpi-analyze"),
            str(recipes["cpi"]),
            "--out",
            str(fresh(out / "hist")),
            "--strategy",
            "histogram",
            "-q",
        ],
    }
    run_measured(commands["plain read"](), work)  # warm the page cache
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for r in range(args.repeat):
        for name, cmd in commands.items():
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
