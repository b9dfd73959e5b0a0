"""Tables (markdown) and sweep plots of a quality-benchmark run."""

from __future__ import annotations

import statistics
from pathlib import Path


def _cell(mean_std, pct: bool = True, signed: bool = False, digits: int = 1) -> str:
    mean, std = mean_std
    scale = 100.0 if pct else 1.0
    sign = "+" if signed and mean > 0 else ""
    return f"{sign}{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main_table(summary: dict) -> list[str]:
    """The headline table: accuracy per task, average, general-text loss, distance from θ0."""
    s = summary["setting"]
    tasks = list(s["tasks"])
    first = next(iter(summary["main"].values()))
    general = "general_loss" in first
    head = ["model", *tasks, "average"]
    head += ["general-text loss"] if general else []
    head += ["‖θ − θ0‖ / ‖θ0‖ (%)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    same = summary.get("same_run", {})
    for row, cols in summary["main"].items():
        cells = [_cell(cols[c]) for c in [*tasks, "avg"]]
        cells += [_cell(cols["general_loss"], pct=False, digits=3)] if general else []
        cells += [_cell(cols["update_norm"], digits=3)]
        name = row
        if row in same:
            where = (
                ""
                if len(same[row]["seeds"]) == len(s["seeds"])
                else " in seeds " + ", ".join(map(str, same[row]["seeds"]))
            )
            name = f"{row} (same run as {same[row]['as']}{where})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_tables(per_seed: dict, key: str = "diagnostics") -> list[str]:
    """The plan's merge-ability diagnostics, mean ± std over seeds, and seed 0's verdict."""
    seeds = [per_seed[k][key] for k in per_seed]
    names = seeds[0]["names"]
    lines = [
        "| task | ‖θi − θ0‖ / ‖θ0‖ (%) | core energy share (%) | share of entries holding "
        "50% / 90% of the update (%) |",
        "|---|---:|---:|---:|",
    ]
    for task in names:
        rows = [d["tasks"][task] for d in seeds]
        norm = _mean_std([r["relative_update_norm"] for r in rows])
        energy = _mean_std([r["core_energy_share"] for r in rows])
        half = _mean_std([r["p_holding"]["0.5"] for r in rows])
        most = _mean_std([r["p_holding"]["0.9"] for r in rows])
        lines.append(
            f"| {task} | {_cell(norm, digits=3)} | {_cell(energy)} | "
            f"{_cell(half, digits=2)} / {_cell(most, digits=2)} |"
        )
    lines += ["", "| pair | cosine of the updates | sign conflicts in Ci ∩ Cj (%) | Jaccard |"]
    lines += ["|---|---:|---:|---:|"]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            cos = _mean_std([d["task_cosine"][i][j] for d in seeds])
            conflicts = [d["sign_conflict_rate"][i][j] for d in seeds]
            conflict = _cell(_mean_std(conflicts)) if None not in conflicts else "no overlap"
            jac = _mean_std([d["jaccard"][i][j] for d in seeds])
            lines.append(
                f"| {names[i]}–{names[j]} | {_cell(cos, pct=False, digits=3)} | {conflict} | "
                f"{_cell(jac, pct=False, digits=3)} |"
            )
    groups = sorted({str(d["groups"]) for d in seeds})
    lines += [
        "",
        f"Groups (stage order; one entry per distinct outcome over the seeds): {', '.join(groups)}.",
        "",
    ]
    lines += ["Verdict (seed 0):", ""] + [f"- {v}" for v in seeds[0]["verdict"] or []]
    return lines


def forgetting_table(summary: dict) -> list[str]:
    """A then B: accuracy on A and B after each stage."""
    s = summary["setting"]
    first = next(iter(summary["forgetting"].values()))
    general = "general loss after B" in first
    lines = [
        f"Forgetting, A = {s['forgetting_pair'][0]} then B = {s['forgetting_pair'][1]} "
        "(accuracy %, change in points):",
        "",
        "| method | A after A | A after B | drop on A | B after A | B after B | gain on B |"
        + (" general-text loss after B |" if general else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if general else ""),
    ]
    for row, cols in summary["forgetting"].items():
        line = (
            f"| {row} | {_cell(cols['A after A'])} | {_cell(cols['A after B'])} | "
            f"{_cell(cols['drop on A'], signed=True)} | {_cell(cols['B after A'])} | "
            f"{_cell(cols['B after B'])} | {_cell(cols['gain on B'], signed=True)} |"
        )
        if general:
            line += f" {_cell(cols['general loss after B'], pct=False, digits=3)} |"
        lines.append(line)
    return lines


def write_markdown(path: Path, summary: dict) -> None:
    """The main table, the diagnostics, the forgetting table, the sweeps and the machine."""
    s = summary["setting"]
    n_seeds = len(s["seeds"])
    metric = "greedy exact match" if s["model"] == "toy" else "greedy exact match (one pass)"
    lines = [
        f"Accuracy (%, {metric}) on {s['n_eval']} held-out prompts per task, mean ± std over "
        f"{n_seeds} seed(s).",
        "",
        *main_table(summary),
        "",
        "Merge-ability diagnostics of the probes' plan (p = "
        f"{s['core_fraction']:g}, τ = {s['tau']:g}):",
        "",
        *diagnostics_tables(summary["per_seed"]),
        "",
        *forgetting_table(summary),
        "",
        "Diagnostics of the forgetting pair's plan:",
        "",
        *diagnostics_tables(summary["per_seed"], "forgetting_diagnostics"),
        "",
    ]
    sweeps = summary.get("sweeps") or {}
    if "tau" in sweeps:
        lines += [
            "CPI-FT average accuracy (%) by τ: "
            + ", ".join(f"τ={k}: {_cell(v)}" for k, v in sweeps["tau"].items()),
            "",
        ]
    if "p_cpi_ft" in sweeps:
        lines += [
            "By core fraction p (fusion alone / CPI-FT): "
            + ", ".join(
                f"p={k}: {_cell(sweeps['p_fusion'][k])} / {_cell(v)}"
                for k, v in sweeps["p_cpi_ft"].items()
            ),
            "",
        ]
    minutes = ", ".join(f"seed {k}: {v['minutes']} min" for k, v in summary["per_seed"].items())
    lines += [
        f"Machine: {summary['machine']['summary']}. Date {summary['date']}; wall time "
        f"{summary['minutes']} min in all ({minutes}).",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _sweep(ax, values: dict, label: str, marker: str) -> None:
    xs = list(values)
    means = [100 * values[x][0] for x in xs]
    stds = [100 * values[x][1] for x in xs]
    ax.errorbar(range(len(xs)), means, yerr=stds, marker=marker, capsize=3, label=label)
    ax.set_xticks(range(len(xs)), xs)


def write_sweep_plots(folder: Path, summary: dict) -> None:
    """``tau_sweep.png`` and ``p_sweep.png``, with the Full SFT and fusion references."""
    from matplotlib.figure import Figure

    from benchmarks.quality.rows import FULL_SFT, MULTI_STAGE

    main = summary["main"]
    refs = {
        "Full SFT": main[FULL_SFT]["avg"][0],
        "Multi-stage SFT": main[MULTI_STAGE]["avg"][0],
        "task arithmetic": main["mergekit task arithmetic"]["avg"][0],
    }
    for name, keys, xlabel in [
        ("tau_sweep.png", [("tau", "CPI-FT")], "τ (Jaccard threshold for grouping)"),
        (
            "p_sweep.png",
            [("p_cpi_ft", "CPI-FT"), ("p_fusion", "CPI fusion alone")],
            "p (core fraction)",
        ),
    ]:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        for (key, label), marker in zip(keys, "os", strict=False):
            _sweep(ax, summary["sweeps"][key], label, marker)
        for (label, value), style in zip(refs.items(), [":", "--", "-."], strict=True):
            ax.axhline(100 * value, ls=style, color="grey", lw=1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("average exact match (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
