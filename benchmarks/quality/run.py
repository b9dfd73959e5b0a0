"""The quality benchmark, one command: every row of the comparison, over several seeds.

    python -m benchmarks.quality.run                         # toy model, 3 seeds (~12 min)
    python -m benchmarks.quality.run --quick                 # toy smoke test (CI)
    python -m benchmarks.quality.run --model smollm2 --seeds 1    # SmolLM2-135M, one seed
    python -m benchmarks.quality.run --model smollm2 --quick      # its smoke test
    python -m benchmarks.quality.run --model smollm2 --device cuda

Writes ``<out>/results.json`` (every number, per seed, with the machine), ``<out>/
results.md`` (the tables) and, for the toy, ``<out>/tau_sweep.png`` / ``p_sweep.png``.
See benchmarks/RESULTS.md for runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

SETTINGS = ("toy", "smollm2")


def aggregate(per_seed: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and (sample) standard deviation over seeds, per row and column."""
    result: dict[str, dict[str, tuple[float, float]]] = {}
    for row in per_seed[0]:
        result[row] = {}
        for col in per_seed[0][row]:
            values = [seed[row][col] for seed in per_seed]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            result[row][col] = (statistics.fmean(values), std)
    return result


def same_runs(seeds: dict[int, dict]) -> dict[str, dict]:
    """Rows that repeated another row's run: ``{row: {"as": other row, "seeds": [...]}}``."""
    same: dict[str, dict] = {}
    for seed, result in seeds.items():
        for row, source in result["same_run"].items():
            same.setdefault(row, {"as": source, "seeds": []})["seeds"].append(seed)
    return same


def _setting(model: str, quick: bool, seeds: int | None):
    if model == "smollm2":
        from benchmarks.quality.smollm2_world import SMOLLM2, SMOLLM2_QUICK

        setting = SMOLLM2_QUICK if quick else SMOLLM2
    else:
        from benchmarks.quality.world import FULL, QUICK

        setting = QUICK if quick else FULL
    if seeds is not None:
        setting = replace(setting, seeds=tuple(range(seeds)))
    return setting


def _base(setting, out: Path, progress: bool) -> Path:
    if setting.model == "smollm2":
        from benchmarks.quality.smollm2_world import smollm2_base

        return smollm2_base(out / "cache")
    from benchmarks.quality.world import pretrained_base

    return pretrained_base(out / "cache", setting, progress=progress)


def run_seed(out: Path, setting, seed: int, base: Path, device: str, progress: bool) -> dict:
    """Every row of one seed, with the diagnostics of its plans and its wall time."""
    from benchmarks.quality.pipeline import SeedRun
    from benchmarks.quality.rows import forgetting_plan, forgetting_rows, main_rows, sweeps

    started = time.time()

    def say(text: str) -> None:  # a line per model: a 35-minute run shows it moving
        print(f"[seed {seed}, {(time.time() - started) / 60:5.1f} min] {text}", flush=True)

    run = SeedRun(out, setting, seed, base, progress=progress, device=device, say=say)
    main, same = main_rows(run)
    result = {
        "main": main,
        "same_run": same,
        "forgetting": forgetting_rows(run),
        "sweeps": sweeps(run),
        "diagnostics": run.diagnostics(run.fused() / "cpi_plan.json"),
        "forgetting_diagnostics": run.diagnostics(forgetting_plan(run)),
    }
    result["timings"] = run.timings
    result["scoring"] = {"models": run.scorer.scored, "seconds": round(run.scorer.seconds, 1)}
    trained = [t for t in run.timings.values() if t.get("steps")]
    if trained:  # includes loading, core streaming and saving: an upper bound per step
        seconds = sum(t["seconds"] for t in trained)
        result["seconds_per_step"] = round(seconds / sum(t["steps"] for t in trained), 2)
    result["minutes"] = round((time.time() - started) / 60, 1)
    return result


def main() -> None:
    """Parse the command line, run every seed, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=SETTINGS, default="toy", help="Which world.")
    parser.add_argument("--quick", action="store_true", help="Small smoke test (minutes).")
    parser.add_argument("--seeds", type=int, default=None, help="Run seeds 0..N-1 only.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--out", type=Path, default=None, help="Output folder (default bench_workdir/quality*)."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for the toy, whose matrices are too small to share; "
        "every core for SmolLM2).",
    )
    parser.add_argument("--progress", action="store_true", help="Show training progress bars.")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # training too (the Trainer takes any GPU)
    # Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made
    # a toy step 10x slower (0.85 s instead of 0.09 s, measured). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    threads = args.threads or (1 if args.model == "toy" else None)
    if threads:
        torch.set_num_threads(threads)

    from benchmarks.quality.machine import machine_info
    from benchmarks.quality.report import write_markdown, write_sweep_plots

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    setting = _setting(args.model, args.quick, args.seeds)
    name = "quality" + ("" if args.model == "toy" else f"_{args.model}")
    out = args.out or Path("bench_workdir") / (name + ("_quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device)
    print(f"machine: {machine['summary']}", flush=True)
    started = time.time()
    base = _base(setting, out, args.progress)
    print(f"base ready ({time.time() - started:.0f} s): {base}", flush=True)
    seeds = {}
    for seed in setting.seeds:
        seeds[seed] = run_seed(out, setting, seed, base, args.device, args.progress)
        print(
            f"seed {seed} done in {seeds[seed]['minutes']} min: CPI-FT avg "
            f"{seeds[seed]['main']['CPI-FT (fusion + consolidation)']['avg']:.3f}",
            flush=True,
        )

    ordered = [seeds[s] for s in setting.seeds]
    summary = {
        "setting": setting.as_dict(),
        "machine": machine,
        "load_average_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": round((time.time() - started) / 60, 1),
        "main": aggregate([s["main"] for s in ordered]),
        "same_run": same_runs(seeds),
        "forgetting": aggregate([s["forgetting"] for s in ordered]),
        "sweeps": aggregate([s["sweeps"] for s in ordered]) if ordered[0]["sweeps"] else {},
        "per_seed": seeds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    write_markdown(out / "results.md", summary)
    if summary["sweeps"]:
        write_sweep_plots(out, summary)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json and results.md in {summary['minutes']} min")


if __name__ == "__main__":
    main()
