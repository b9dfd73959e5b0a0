"""Tables (markdown) and sweep plots of a quality-benchmark run."""

from __future__ import annotations

from pathlib import Path


def _cell(mean_std, pct: bool = True, signed: bool = False) -> str:
    mean, std = mean_std
    scale = 100.0 if pct else 1.0
    sign = "+" if signed and mean > 0 else ""
    return f"{sign}{scale * mean:.1f} ± {scale * std:.1f}"


def write_markdown(path: Path, summary: dict) -> None:
    """The main table, the forgetting table, the regime check and the sweeps."""
    s = summary["setting"]
    tasks = list(s["tasks"])
    n_seeds = len(s["seeds"])
    lines = [
        f"Exact-match accuracy (%) on {s['n_eval']} held-out prompts per task, mean ± std over "
        f"{n_seeds} seed(s).",
        "",
        "| model | " + " | ".join(tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for row, cols in summary["main"].items():
        lines.append(f"| {row} | " + " | ".join(_cell(cols[c]) for c in [*tasks, "avg"]) + " |")
    norms = summary["relative_norms"]
    lines += [
        "",
        "Regime check: ‖θi − θ0‖ / ‖θ0‖ of the probes: "
        + ", ".join(f"{t} {100 * norms[t][0]:.2f}%" for t in tasks)
        + ".",
        "",
        f"Forgetting, A = {s['forgetting_pair'][0]} then B = {s['forgetting_pair'][1]} "
        "(accuracy %, change in points):",
        "",
        "| method | A after A | A after B | drop on A | B after A | B after B | gain on B |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, cols in summary["forgetting"].items():
        lines.append(
            f"| {row} | {_cell(cols['A after A'])} | {_cell(cols['A after B'])} | "
            f"{_cell(cols['drop on A'], signed=True)} | {_cell(cols['B after A'])} | "
            f"{_cell(cols['B after B'])} | {_cell(cols['gain on B'], signed=True)} |"
        )
    sweeps = summary["sweeps"]
    lines += [
        "",
        "CPI-FT average accuracy (%) by τ: "
        + ", ".join(f"τ={k}: {_cell(v)}" for k, v in sweeps["tau"].items()),
        "",
        "By core fraction p (fusion alone / CPI-FT): "
        + ", ".join(
            f"p={k}: {_cell(sweeps['p_fusion'][k])} / {_cell(v)}"
            for k, v in sweeps["p_cpi_ft"].items()
        ),
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

    main = summary["main"]
    refs = {
        "Full SFT": main["Full SFT (multi-task)"]["avg"][0],
        "Multi-stage SFT": main["Multi-stage SFT (random order, same groups)"]["avg"][0],
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
