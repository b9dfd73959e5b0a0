"""The human summary of an analysis, as plain text for the terminal."""

from __future__ import annotations

from cpi_merge.analysis.plan import CorePlan


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def format_summary(plan: CorePlan) -> str:
    """Tasks with thresholds and core sizes, the Jaccard matrix, and the stage plan.

    Args:
        plan: The analysis result.

    Returns:
        Multi-line text.

    """
    ties = "exactly k each (tie rule)" if plan.exact_k else "every entry at t_i included"
    lines = [
        f"CPI analysis of {len(plan.tasks)} task(s) against base {plan.base_model!r}",
        f"  D = {plan.total_parameters:,} entries, core_fraction p = {plan.core_fraction:g} "
        f"(k = {plan.k:,}; {ties}), tau = {plan.tau:g}"
        + (f", strategy = {plan.strategy}" if plan.strategy else ""),
    ]
    if plan.strategy_reason:
        lines.append(f"  strategy {plan.strategy}: {plan.strategy_reason}")
    lines.append("")
    rows = []
    for i, t in enumerate(plan.tasks, 1):
        rel = "-" if t.relative_update_norm is None else f"{t.relative_update_norm:.3%}"
        count = "-" if t.core_count is None else f"{t.core_count:,}"
        share = (
            "-" if t.core_count is None else f"{100 * t.core_count / plan.total_parameters:.3f}%"
        )
        at = "-" if t.at_threshold is None else f"{t.at_threshold:,}"
        took = "-" if t.taken_at_threshold is None else f"{t.taken_at_threshold:,}"
        energy = "-" if t.core_energy_share is None else f"{t.core_energy_share:.1%}"
        row = [str(i), t.name, f"{t.core_threshold:.6e}", count, share, at, took, rel, energy]
        rows.append(row)
    header = ["#", "task", "threshold t_i", "core entries", "core %", "at t_i", "taken"]
    header += ["|Δ|/|θ0|", "energy in core"]
    lines += _table(header, rows, set(range(9)) - {1})
    lines.append(
        "  (at t_i: entries whose |Δ| equals the threshold; taken: how many the core holds;"
    )
    lines.append("   energy in core: its share of the task's Σ (θi − θ0)²)")
    if not plan.analysed:
        lines += ["", "Thresholds were given in the recipe: overlaps and groups not computed."]
        return "\n".join(lines)
    n = len(plan.tasks)
    lines += ["", "Jaccard similarity of cores (above the diagonal) and cosine of the updates"]
    lines += ["θi − θ0 (below it):"]
    cosine = plan.task_cosine
    rows = [
        [str(i + 1)]
        + [
            "—"
            if i == j
            else f"{plan.jaccard[i][j]:.4f}"
            if j > i or cosine is None
            else f"{cosine[i][j]:+.4f}"
            for j in range(n)
        ]
        for i in range(n)
    ]
    lines += _table([""] + [str(j + 1) for j in range(n)], rows, set(range(n + 1)))
    how = "random order, seed " + str(plan.seed) if plan.order == "random" else "recipe order"
    lines += [
        "",
        f"Stages ({len(plan.groups)} group(s), edges where Jaccard >= {plan.tau:g}; {how}):",
    ]
    for s, group in enumerate(plan.groups, 1):
        lines.append(f"  stage {s}: " + ", ".join(group))
    if plan.verdict:
        lines += ["", "Merge-ability (thresholds from the benchmarks; see the README):"]
        lines += [f"  - {line}" for line in plan.verdict]
    return "\n".join(lines)
