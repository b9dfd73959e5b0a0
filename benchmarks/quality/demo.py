"""``make demo``: the whole CPI-FT pipeline on the built-in example, offline, in minutes.

1. make a small pretrained base (a character-level Llama pretrained here; cached),
2. Stage 1: one probe fine-tune per task (``cpi-consolidate probe``),
3. Stages 2-3: ``cpi-analyze`` (cores, overlaps, groups) and ``cpi-merge`` (the fusion),
4. Stage 4: ``cpi-consolidate`` (masked multi-stage fine-tune),
5. print one table: exact-match accuracy per task for the base, each probe, the fused
   model and the consolidated model.

Everything is written under ``demo_workdir/``. The full comparison with every baseline and
three seeds is ``python -m benchmarks.quality.run`` (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.quality.world import FULL

WORKDIR = Path("demo_workdir")
DEMO = replace(FULL, seeds=(0,))


def _row(name: str, scores: dict, tasks) -> str:
    cells = " | ".join(f"{100 * scores[t]:5.1f}" for t in [*tasks, "avg"])
    return f"| {name:<34s} | {cells} |"


def main() -> int:
    """Run the demo; return the process exit status."""
    import transformers

    from benchmarks.quality.pipeline import SeedRun
    from benchmarks.quality.world import pretrained_base
    from cpi_merge.analysis.plan import CorePlan
    from cpi_merge.report.summary import format_summary

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    started = time.time()

    def say(text: str) -> None:
        print(f"[{time.time() - started:5.0f} s] {text}", flush=True)

    say(f"1/5 pretrained base ({DEMO.hidden}-wide, {DEMO.layers} layers; made once, then cached)")
    base = WORKDIR / "base"  # a stable path, as merge_configs/example.yml names it
    if not (base / "config.json").exists():
        shutil.copytree(pretrained_base(WORKDIR / "cache", DEMO), base, dirs_exist_ok=True)
    run = SeedRun(WORKDIR, DEMO, 0, base)
    say(f"2/5 probes: one short fine-tune of the base per task: {', '.join(DEMO.tasks)}")
    probes = run.probes()
    say("3/5 cpi-analyze + cpi-merge: exact cores, overlaps, groups, fusion")
    fused = run.fused()
    plan = CorePlan.load(fused)
    say("4/5 cpi-consolidate: stages in group order, earlier cores frozen")
    consolidated = run.consolidate(
        "consolidated", model=fused, plan=fused / "cpi_plan.json", freeze="previous_groups"
    )
    say("5/5 evaluating every model on held-out prompts (exact match)")
    rows = [("base θ0", run.score(base))]
    rows += [(f"probe: {t}", run.score(p)) for t, p in probes.items()]
    rows += [
        ("CPI fusion (cpi-merge)", run.score(fused)),
        ("CPI-FT (fusion + consolidation)", run.score(consolidated)),
    ]

    print()
    print(format_summary(plan))
    print()
    tasks = list(DEMO.tasks)
    print(f"Exact-match accuracy (%), {DEMO.n_eval} held-out prompts per task:")
    print("| " + f"{'model':<34s}" + " | " + " | ".join(f"{t:>5s}" for t in [*tasks, "avg"]) + " |")
    print("|" + "-" * 36 + "|" + "------:|" * (len(tasks) + 1))
    for name, scores in rows:
        print(_row(name, scores, tasks))
    print()
    print(
        f"Models, plan and pictures are under {WORKDIR}/ (merged model: {fused}, "
        f"consolidated: {consolidated}). Took {time.time() - started:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
