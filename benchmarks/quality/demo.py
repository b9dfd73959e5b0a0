"""``make demo``: the whole CPI-FT pipeline on the built-in example, offline, in ~2 minutes.

1. make a small pretrained base (a character-level Llama pretrained here; cached),
2. Stage 1: one probe fine-tune per task (``cpi-consolidate probe``),
3. Stages 2-3: ``cpi-analyze`` (cores, overlaps, groups) and ``cpi-merge`` (the fusion),
4. Stage 4: ``cpi-consolidate`` (masked multi-stage fine-tune),
5. print one table: exact-match accuracy per task for the base, each probe, the fused
   model and the consolidated model.

Every step that trains shows a progress bar with an ETA; each step's time is printed.
Everything is written under ``demo_workdir/``. The full comparison with every baseline
and three seeds is ``python -m benchmarks.quality.run`` (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.quality.world import FULL

WORKDIR = Path("demo_workdir")
DEMO = replace(
    FULL,  # the benchmark's tasks and model, with a shorter pretraining and evaluation
    seeds=(0,),
    pretrain_steps=1000,
    pretrain_tagged_per_task=40,  # fewer tagged examples: a base that follows the tags less
    probe_steps=60,
    consolidation_steps_per_task=25,
    n_eval=100,
)


def _row(name: str, scores: dict, tasks) -> str:
    cells = " | ".join(f"{100 * scores[t]:5.1f}" for t in [*tasks, "avg"])
    return f"| {name:<34s} | {cells} |"


class _Steps:
    """Prints each step's start and, at the next one, how long the last one took."""

    def __init__(self, total: int):
        self.total = total
        self.started = time.time()
        self.current: tuple[str, float] | None = None
        self.times: list[tuple[str, float]] = []

    def next(self, text: str) -> None:
        self._close()
        number = len(self.times) + 1
        print(f"{number}/{self.total} {text}", flush=True)
        self.current = (text.split(":")[0], time.time())

    def _close(self) -> None:
        if self.current is not None:
            name, began = self.current
            self.times.append((name, time.time() - began))
            print(f"    done in {self.times[-1][1]:.0f} s", flush=True)
            self.current = None

    def finish(self) -> None:
        self._close()


def main() -> int:
    """Run the demo; return the process exit status."""
    steps = _Steps(6)
    steps.next("importing torch, transformers, mergekit")
    # One thread, and idle OpenMP threads sleep: on a busy 2-core machine two spinning
    # threads made each step of this small model 10x slower (measured: 0.85 s vs 0.09 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    from benchmarks.quality.pipeline import SeedRun
    from benchmarks.quality.progress import quiet_trainer_bars
    from benchmarks.quality.world import pretrained_base
    from cpi_merge.analysis.plan import CorePlan
    from cpi_merge.report.summary import format_summary

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tasks = list(DEMO.tasks)
    with quiet_trainer_bars():
        base = WORKDIR / "base"  # a stable path, as merge_configs/example.yml names it
        cached = (base / "config.json").exists()
        steps.next(
            f"pretrained base: a {DEMO.hidden}-wide, {DEMO.layers}-layer Llama, "
            f"{DEMO.pretrain_steps} steps on the four tasks"
            + (" (cached)" if cached else " (made once, then cached)")
        )
        if not cached:
            made = pretrained_base(WORKDIR / "cache", DEMO, progress=True)
            shutil.copytree(made, base, dirs_exist_ok=True)
        run = SeedRun(WORKDIR, DEMO, 0, base, progress=True)
        steps.next(f"probes: {DEMO.probe_steps} steps of the base per task: {', '.join(tasks)}")
        probes = run.probes()
        steps.next("cpi-analyze + cpi-merge: exact cores, overlaps, groups, fusion")
        fused = run.fused()
        plan = CorePlan.load(fused)
        steps.next(
            f"cpi-consolidate: {DEMO.consolidation_steps_per_task} steps per task, stages in "
            "group order, earlier cores frozen"
        )
        consolidated = run.consolidate(
            "consolidated", model=fused, plan=fused / "cpi_plan.json", freeze="previous_groups"
        )
    steps.next(f"evaluating 7 models on {DEMO.n_eval} held-out prompts per task (exact match)")
    named = [("base θ0", base)] + [(f"probe: {t}", p) for t, p in probes.items()]
    named += [("CPI fusion (cpi-merge)", fused), ("CPI-FT (fusion + consolidation)", consolidated)]
    rows = [(name, run.score(folder)) for name, folder in tqdm(named, desc="    models")]
    steps.finish()

    print()
    print(format_summary(plan))
    print()
    print(f"Exact-match accuracy (%), {DEMO.n_eval} held-out prompts per task:")
    print("| " + f"{'model':<34s}" + " | " + " | ".join(f"{t:>5s}" for t in [*tasks, "avg"]) + " |")
    print("|" + "-" * 36 + "|" + "------:|" * (len(tasks) + 1))
    for name, scores in rows:
        print(_row(name, scores, tasks))
    print()
    took = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in steps.times)
    print(
        f"Models, plan and pictures are under {WORKDIR}/ (merged model: {fused}, "
        f"consolidated: {consolidated}). Took {time.time() - steps.started:.0f} s: {took}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
