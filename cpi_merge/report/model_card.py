"""mergekit's model card (README.md of the output), finished for a cpi merge.

The title names the output folder (mergekit saw only the temporary one), the metadata
header drops an empty ``base_model: []`` (local folders are not Hub ids) and gains the
``cpi-merge`` tag, and a section lists every task's core, its ties and the groups.
"""

from __future__ import annotations

import yaml

from cpi_merge.analysis.plan import CorePlan
from cpi_merge.config.recipe import CpiRecipe


def cpi_card_section(plan: CorePlan, recipe: CpiRecipe) -> str:
    """Markdown listing tasks, thresholds, groups and the Jaccard heatmap.

    Args:
        plan: The plan the merge used.
        recipe: The recipe (for the fusion base and ω).

    Returns:
        Markdown text, starting with a blank line.

    """
    p = recipe.parameters
    lines = [
        "",
        "## CPI-FT fusion",
        "",
        "Merged with [cpi-merge](https://arxiv.org/abs/2508.21741) (Core Parameter Isolation): "
        f"each task's core (the k = {plan.k:,} entries with the largest |θi − θ0| over the "
        f"whole model, p = {plan.core_fraction:g} of D = {plan.total_parameters:,}"
        + (
            "; exactly k, ties at the threshold decided by the tie rule"
            if plan.exact_k
            else "; every entry tied at the threshold included"
        )
        + ") is copied from that task; the other entries are SLERP-fused starting from the "
        f"fusion base `{recipe.name_of(recipe.fusion_base)}` (ω = {p.omega:g} unless set "
        "per model).",
        "",
        "| task | core threshold t_i | core entries | entries at t_i (taken) | ‖θi − θ0‖ / ‖θ0‖ "
        "| energy in core |",
        "|---|---|---|---|---|---|",
    ]
    for t in plan.tasks:
        count = f"{t.core_count:,}" if t.core_count is not None else "—"
        rel = f"{t.relative_update_norm:.3%}" if t.relative_update_norm is not None else "—"
        ties = "—" if t.at_threshold is None else f"{t.at_threshold:,} ({t.taken_at_threshold:,})"
        energy = "—" if t.core_energy_share is None else f"{t.core_energy_share:.1%}"
        lines.append(
            f"| `{t.name}` | {t.core_threshold:.6e} | {count} | {ties} | {rel} | {energy} |"
        )
    lines.append("")
    if plan.analysed:
        lines.append(
            f"Groups (Jaccard ≥ τ = {plan.tau:g}), in stage order ({plan.order}, seed {plan.seed}):"
        )
        lines.append("")
        for s, group in enumerate(plan.groups, 1):
            lines.append(f"{s}. " + ", ".join(f"`{name}`" for name in group))
        lines += ["", "![Jaccard similarity of the task cores](jaccard.png)", ""]
        if plan.verdict:
            lines += ["Merge-ability, as measured by the analysis:", ""]
            lines += [f"- {line}" for line in plan.verdict]
            lines += ["", "![Update energy and directions](diagnostics.png)", ""]
    else:
        lines += [
            "Core thresholds were given in the recipe, so overlaps and groups were not "
            "computed (run `cpi-analyze` for them).",
            "",
        ]
    lines.append(
        "Files: `cpi_plan.json` (the analysis used), `mergekit_config.yml` (the "
        "resolved recipe), `cpi_manifest.json` (sizes and SHA-256 of inputs and outputs)."
    )
    lines.append("")
    return "\n".join(lines)


def finish_card(text: str, written_as: str, name: str, plan: CorePlan, recipe: CpiRecipe) -> str:
    """Mergekit's card with the right title, a clean metadata header and the CPI section.

    Args:
        text: The card mergekit wrote.
        written_as: The folder name mergekit wrote into (the temporary one).
        name: The output folder's name.
        plan: The plan the merge used.
        recipe: The recipe.
    """
    text = text.replace(f"# {written_as}\n", f"# {name}\n", 1)
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        header, body = text[4:].split("\n---\n", 1)
        meta = yaml.safe_load(header) or {}
        if not meta.get("base_model"):
            meta.pop("base_model", None)
        meta["tags"] = [*meta.get("tags", []), "cpi-merge"]
        text = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body
    return text + cpi_card_section(plan, recipe)
