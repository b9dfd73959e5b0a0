"""The quality benchmark, one command: every row of the comparison, over several seeds.

    python -m benchmarks.quality.run              # the full run (~40-60 min on 2 CPU cores)
    python -m benchmarks.quality.run --quick      # a few-minute smoke test (CI)

Writes ``<out>/results.json`` (every number, per seed), ``<out>/results.md`` (the tables)
and ``<out>/tau_sweep.png`` / ``<out>/p_sweep.png``. See benchmarks/RESULTS.md for a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from benchmarks.quality.pipeline import SeedRun
from benchmarks.quality.report import write_markdown, write_sweep_plots
from benchmarks.quality.world import FULL, QUICK, Setting, pretrained_base


def main_rows(run: SeedRun) -> dict[str, dict[str, float]]:
    """The headline table for one seed: row name -> accuracy per task and average."""
    s = run.s
    rows = {"base θ0": run.score(run.base)}
    for task, folder in run.probes().items():
        rows[f"probe: {task}"] = run.score(folder)
    fused = run.fused()
    plan = fused / "cpi_plan.json"
    budget = s.probe_steps + s.consolidation_steps_per_task  # per task, as CPI-FT spends
    sft = dict(
        model=run.base,
        plan=plan,
        freeze="none",
        samples=s.n_train,
        steps_per_task=budget,
        lr=s.probe_lr,
    )
    rows["Full SFT (multi-task)"] = run.score(run.consolidate("full_sft", stages="single", **sft))
    rows["Multi-stage SFT (random order, same groups)"] = run.score(
        run.consolidate("multistage_sft", **sft)
    )
    rows["mergekit task arithmetic"] = run.score(run.mergekit("task_arithmetic"))
    rows["mergekit TIES"] = run.score(run.mergekit("ties"))
    rows["mergekit Multi-SLERP"] = run.score(run.mergekit("multislerp"))
    rows["CPI fusion alone"] = run.score(fused)
    rows["CPI-FT (fusion + consolidation)"] = run.score(
        run.consolidate("cpi_ft", model=fused, plan=plan, freeze="previous_groups")
    )
    rows["CPI-FT, τ = 0 (no grouping)"] = run.score(
        run.consolidate("cpi_ft_tau0", model=fused, plan=run.plan(0.0), freeze="previous_groups")
    )
    rows["control: fusion + same data, nothing frozen"] = run.score(
        run.consolidate("ctrl_fused_nofreeze", model=fused, plan=plan, freeze="none")
    )
    rows["control: θ0 + same data"] = run.score(
        run.consolidate("ctrl_base", model=run.base, plan=plan, freeze="none")
    )
    return rows


def forgetting_rows(run: SeedRun) -> dict[str, dict[str, float]]:
    """A → B sequential fine-tuning: drop on A and gain on B after the B stage."""
    s = run.s
    a, b = s.forgetting_pair
    probes = run.probes()
    plan = run.plan(1.0, models=[probes[a], probes[b]], order="given", name="plan_forgetting")
    rows = {}
    for label, name, freeze, optimizer in [
        ("Full SFT (A then B, fresh optimizer)", "forget_full", "none", "reset"),
        ("Multi-stage SFT (A then B, optimizer carried)", "forget_multistage", "none", "carry"),
        ("CPI-FT (core of A frozen while B trains)", "forget_cpi", "previous_groups", "carry"),
    ]:
        out = run.consolidate(
            name,
            model=run.base,
            plan=plan,
            freeze=freeze,
            samples=s.n_train,
            steps_per_task=s.probe_steps,
            lr=s.probe_lr,
            optimizer_state=optimizer,
        )
        after_a, after_b = run.score(out / "stages" / "1"), run.score(out)
        rows[label] = {
            "A after A": after_a[a],
            "A after B": after_b[a],
            "drop on A": after_b[a] - after_a[a],
            "B after A": after_a[b],
            "B after B": after_b[b],
            "gain on B": after_b[b] - after_a[b],
        }
    return rows


def sweeps(run: SeedRun) -> dict[str, dict[str, float]]:
    """CPI-FT average accuracy over τ, and fusion / CPI-FT over p."""
    s = run.s
    fused = run.fused()
    out: dict[str, dict[str, float]] = {"tau": {}, "p_fusion": {}, "p_cpi_ft": {}}
    seen: dict[str, float] = {}
    for tau in s.tau_sweep:
        plan = run.plan(tau)
        groups = json.dumps(json.loads(plan.read_text())["groups"])
        if groups not in seen:  # same groups, same stages: the same run
            seen[groups] = run.score(
                run.consolidate(
                    f"sweep_tau{tau:g}", model=fused, plan=plan, freeze="previous_groups"
                )
            )["avg"]
        out["tau"][f"{tau:g}"] = seen[groups]
    for p in s.p_sweep:
        fused_p = run.fused(p)
        out["p_fusion"][f"{p:g}"] = run.score(fused_p)["avg"]
        out["p_cpi_ft"][f"{p:g}"] = run.score(
            run.consolidate(
                f"sweep_p{p:g}",
                model=fused_p,
                plan=fused_p / "cpi_plan.json",
                freeze="previous_groups",
            )
        )["avg"]
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small smoke test (a few minutes).")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Output folder (default bench_workdir/quality[_quick]).",
    )
    parser.add_argument("--progress", action="store_true", help="Show training progress bars.")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    setting: Setting = QUICK if args.quick else FULL
    out = args.out or Path("bench_workdir") / ("quality_quick" if args.quick else "quality")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    base = pretrained_base(out / "cache", setting, progress=args.progress)
    print(f"base ready ({time.time() - started:.0f} s): {base}", flush=True)
    seeds = {}
    for seed in setting.seeds:
        run = SeedRun(out, setting, seed, base, progress=args.progress)
        seeds[seed] = {
            "main": main_rows(run),
            "forgetting": forgetting_rows(run),
            "sweeps": sweeps(run),
            "relative_norms": run.relative_norms(),
            "groups": json.loads((run.fused() / "cpi_plan.json").read_text())["groups"],
            "jaccard": json.loads((run.fused() / "cpi_plan.json").read_text())["jaccard"],
        }
        print(
            f"seed {seed} done ({time.time() - started:.0f} s): CPI-FT avg "
            f"{seeds[seed]['main']['CPI-FT (fusion + consolidation)']['avg']:.3f}",
            flush=True,
        )

    ordered = [seeds[s] for s in setting.seeds]
    summary = {
        "setting": setting.as_dict(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "minutes": round((time.time() - started) / 60, 1),
        "main": aggregate([s["main"] for s in ordered]),
        "forgetting": aggregate([s["forgetting"] for s in ordered]),
        "sweeps": aggregate([s["sweeps"] for s in ordered]),
        "relative_norms": aggregate([{"norm": s["relative_norms"]} for s in ordered])["norm"],
        "per_seed": seeds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    write_markdown(out / "results.md", summary)
    write_sweep_plots(out, summary)
    print((out / "results.md").read_text())
    print(
        f"wrote {out}/results.json, results.md, tau_sweep.png, p_sweep.png "
        f"in {summary['minutes']} min"
    )


if __name__ == "__main__":
    main()
