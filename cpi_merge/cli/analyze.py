"""``cpi-analyze``: exact core regions, overlaps, groups and stage order for a cpi recipe."""

from __future__ import annotations

from pathlib import Path

import click

from cpi_merge.cli.common import analysis_options, report_errors, setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for cpi_plan.json and the pictures (must be new or empty).",
)
@analysis_options
@click.option(
    "--lora-merge-cache",
    type=click.Path(file_okay=False),
    help="Keep merged LoRA adapters (base+adapter references) here; default: a temporary "
    "folder beside OUT, removed at the end.",
)
@click.option("--no-plots", is_flag=True, help="Skip the pictures.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no summary.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@report_errors
def main(
    recipe, out_dir, analysis, force, allow_pickle, lora_merge_cache, no_plots, quiet, verbose
):
    """Analyse RECIPE (a `merge_method: cpi` mergekit recipe) and write OUT/cpi_plan.json.

    Reads every checkpoint tensor by tensor through mergekit's loader, finds each task's
    exact core (the top core_fraction of |θi − θ0| over the whole model), the Jaccard
    overlaps of the cores, the task groups (Jaccard >= tau) and their stage order.
    """
    setup_logging(verbose, quiet)
    from cpi_merge.commands import analyze
    from cpi_merge.report.summary import format_summary

    plan = analyze(
        recipe,
        out_dir,
        force=force,
        allow_pickle=allow_pickle,
        plots=not no_plots,
        lora_merge_cache=lora_merge_cache,
        progress=not quiet,
        **analysis,
    )
    if not quiet:
        click.echo(format_summary(plan))
        written = sorted(p.name for p in Path(out_dir).iterdir())
        click.echo(f"\nWrote {', '.join(f'{out_dir}/{w}' for w in written)}")


if __name__ == "__main__":
    main()
