"""The benchmark's tables: diagnostics next to results, repeated runs named, machine recorded."""

from __future__ import annotations

from dataclasses import asdict

from benchmarks.quality.machine import machine_info
from benchmarks.quality.report import write_markdown
from benchmarks.quality.run import aggregate, same_runs
from benchmarks.quality.smollm2_world import SMOLLM2


def diagnostics(names, shift=0.0):
    n = len(names)
    return {
        "names": names,
        "tasks": {
            t: {
                "relative_update_norm": 0.001 + shift,
                "core_energy_share": 0.3,
                "p_holding": {"0.5": 0.02, "0.9": 0.3},
                "energy_curve": [],
            }
            for t in names
        },
        "task_cosine": [[1.0 if i == j else 0.1 for j in range(n)] for i in range(n)],
        "sign_conflict_rate": [[None if i == j else 0.4 for j in range(n)] for i in range(n)],
        "jaccard": [[1.0 if i == j else 0.05 for j in range(n)] for i in range(n)],
        "groups": [[t] for t in names],
        "verdict": ["updates are close to the base (0.10%)"],
    }


def seed(value: float, same: dict) -> dict:
    tasks = SMOLLM2.tasks
    row = {**{t: value for t in tasks}, "avg": value, "general_loss": 2.5, "update_norm": 0.002}
    a, b = SMOLLM2.forgetting_pair
    forget = {
        "A after A": 0.5,
        "A after B": 0.4,
        "drop on A": -0.1,
        "B after A": 0.1,
        "B after B": 0.6,
        "gain on B": 0.5,
        "general loss after B": 2.6,
    }
    return {
        "main": {"base θ0": row, "CPI-FT (fusion + consolidation)": row, "control": row},
        "same_run": same,
        "forgetting": {"Full SFT (A then B, fresh optimizer)": forget},
        "sweeps": {},
        "diagnostics": diagnostics(list(tasks), shift=value / 100),
        "forgetting_diagnostics": diagnostics([a, b]),
        "minutes": 41.0,
    }


def test_tables_carry_diagnostics_general_loss_and_repeats(tmp_path):
    seeds = {0: seed(0.5, {"control": "CPI-FT (fusion + consolidation)"}), 1: seed(0.7, {})}
    ordered = list(seeds.values())
    summary = {
        "setting": asdict(SMOLLM2) | {"seeds": [0, 1]},
        "machine": machine_info(),
        "date": "2026-11-29",
        "minutes": 82.0,
        "main": aggregate([s["main"] for s in ordered]),
        "same_run": same_runs(seeds),
        "forgetting": aggregate([s["forgetting"] for s in ordered]),
        "sweeps": {},
        "per_seed": seeds,
    }
    write_markdown(tmp_path / "r.md", summary)
    text = (tmp_path / "r.md").read_text()
    assert "| base θ0 | 50.0 ± 0.0 |" not in text  # two seeds: 50 and 70
    assert "60.0 ± 14.1" in text and "general-text loss" in text and "2.500 ± 0.000" in text
    assert "control (same run as CPI-FT (fusion + consolidation) in seeds 0)" in text
    assert "| city–add | 0.100 ± 0.000 | 40.0 ± 0.0 | 0.050 ± 0.000 |" in text
    assert "| words–add |" in text  # the forgetting pair's own plan
    assert "updates are close to the base" in text
    assert "torch" in text and "thread(s)" in text and "seed 0: 41.0 min" in text
    assert "-10.0 ± 0.0" in text and "+50.0 ± 0.0" in text
