"""The rows of one seed: the main table, the forgetting table and the sweeps.

Every fine-tuned row gets the same budget per task: the probes' steps plus the
consolidation's (what CPI-FT spends in all). Two rows that would repeat the same
training (the same model, data, stages and frozen entries) are run once and the second
is recorded as ``same run as`` the first (``SeedRun`` results are deterministic), so a
benchmark whose tasks form one group does not pay twice for identical fine-tunes.
"""

from __future__ import annotations

import json

from benchmarks.quality.pipeline import SeedRun

CPI_FT = "CPI-FT (fusion + consolidation)"
FULL_SFT = "Full SFT (multi-task)"
MULTI_STAGE = "Multi-stage SFT (one task per stage, random order)"


def _groups(plan) -> list[list[str]]:
    return json.loads(plan.read_text())["groups"]


def main_rows(run: SeedRun) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The headline table for one seed, and which rows repeat another row's run.

    Returns:
        Row name → scores (per task, ``avg``, and the scorer's other columns), and
        row name → the row whose run it is (for rows that would repeat one).
    """
    s = run.s
    same: dict[str, str] = {}
    rows = {"base θ0": run.score(run.base)}
    for task, folder in run.probes().items():
        rows[f"probe: {task}"] = run.score(folder, keep=True)
    fused = run.fused()
    plan = fused / "cpi_plan.json"
    budget = s.probe_steps + s.consolidation_steps_per_task  # per task, as CPI-FT spends
    sft = dict(
        model=run.base, freeze="none", samples=s.n_train, steps_per_task=budget, lr=s.probe_lr
    )
    rows[FULL_SFT] = run.score(run.consolidate("full_sft", plan=plan, stages="single", **sft))
    per_task = run.plan(1.0, name="plan_one_task_per_stage")  # τ = 1: every task alone
    rows[MULTI_STAGE] = run.score(run.consolidate("multistage_sft", plan=per_task, **sft))
    rows["mergekit task arithmetic"] = run.score(run.mergekit("task_arithmetic"))
    rows["mergekit TIES"] = run.score(run.mergekit("ties"))
    rows["mergekit Multi-SLERP"] = run.score(run.mergekit("multislerp"))
    rows["CPI fusion alone"] = run.score(fused, keep=True)
    cpi = dict(model=fused, freeze="previous_groups")
    rows[CPI_FT] = run.score(run.consolidate("cpi_ft", plan=plan, **cpi))
    tau0, no_grouping = run.plan(0.0), "CPI-FT, τ = 0 (no grouping)"
    if _groups(tau0) == _groups(plan):
        rows[no_grouping], same[no_grouping] = rows[CPI_FT], CPI_FT
    else:
        rows[no_grouping] = run.score(run.consolidate("cpi_ft_tau0", plan=tau0, **cpi))
    control = "control: fusion + same data, nothing frozen"
    if len(_groups(plan)) == 1:  # one stage: nothing is frozen in CPI-FT either
        rows[control], same[control] = rows[CPI_FT], CPI_FT
    else:
        rows[control] = run.score(
            run.consolidate("ctrl_fused_nofreeze", model=fused, plan=plan, freeze="none")
        )
    rows["control: θ0 + same data"] = run.score(
        run.consolidate("ctrl_base", model=run.base, plan=plan, freeze="none")
    )
    return rows, same


def forgetting_plan(run: SeedRun):
    """The two-task plan of the forgetting table: A's probe then B's, one stage each."""
    a, b = run.s.forgetting_pair
    probes = run.probes()
    return run.plan(1.0, models=[probes[a], probes[b]], order="given", name="plan_forgetting")


def forgetting_rows(run: SeedRun) -> dict[str, dict[str, float]]:
    """A → B sequential fine-tuning: drop on A and gain on B after the B stage."""
    s = run.s
    a, b = s.forgetting_pair
    plan = forgetting_plan(run)
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
            save_stages=True,
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
        if "general_loss" in after_b:
            rows[label]["general loss after B"] = after_b["general_loss"]
    return rows


def sweeps(run: SeedRun) -> dict[str, dict[str, float]]:
    """CPI-FT average accuracy over τ, and fusion / CPI-FT over p (empty sweeps: {})."""
    s = run.s
    out: dict[str, dict[str, float]] = {}
    if s.tau_sweep:
        fused = run.fused()
        out["tau"] = {}
        seen: dict[str, float] = {}
        for tau in s.tau_sweep:
            plan = run.plan(tau)
            groups = json.dumps(_groups(plan))
            if groups not in seen:  # same groups, same stages: the same run
                seen[groups] = run.score(
                    run.consolidate(
                        f"sweep_tau{tau:g}", model=fused, plan=plan, freeze="previous_groups"
                    )
                )["avg"]
            out["tau"][f"{tau:g}"] = seen[groups]
    if s.p_sweep:
        out["p_fusion"], out["p_cpi_ft"] = {}, {}
        for p in s.p_sweep:
            fused_p = run.fused(p)
            out["p_fusion"][f"{p:g}"] = run.score(fused_p, keep=True)["avg"]
            out["p_cpi_ft"][f"{p:g}"] = run.score(
                run.consolidate(
                    f"sweep_p{p:g}",
                    model=fused_p,
                    plan=fused_p / "cpi_plan.json",
                    freeze="previous_groups",
                )
            )["avg"]
    return out
