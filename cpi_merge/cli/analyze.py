"""``cpi-analyze``: exact core regions, overlaps, groups and stage order for a cpi recipe."""

from __future__ import annotations

import click

from cpi_merge.cli.common import parse_size, report_errors, setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for cpi_plan.json and the pictures (must be new or empty).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random stage order.")
@click.option(
    "--order",
    type=click.Choice(["random", "given"]),
    default="random",
    show_default=True,
    help="Stage order: seeded random (the paper) or recipe order.",
)
@click.option(
    "--strategy",
    type=click.Choice(["auto", "buffer", "histogram"]),
    default="auto",
    show_default=True,
    help="buffer: one pass, ~36 B per core entry per task; histogram: three passes, "
    "constant memory; auto: buffer when it fits --memory-budget. Both exact.",
)
@click.option(
    "--memory-budget",
    default=None,
    metavar="SIZE",
    help="Memory the buffer strategy may use, e.g. 8G (default: 40% of RAM).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pytorch_model.bin checkpoints (pickle can run code: trusted files only).",
)
@click.option("--no-plots", is_flag=True, help="Skip the pictures.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no summary.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@report_errors
def main(
    recipe,
    out_dir,
    seed,
    order,
    strategy,
    memory_budget,
    force,
    allow_pickle,
    no_plots,
    quiet,
    verbose,
):
    """Analyse RECIPE (a `merge_method: cpi` mergekit recipe) and write OUT/cpi_plan.json.

    Reads every checkpoint tensor by tensor through mergekit's loader, finds each task's
    exact core (the top core_fraction of |θi − θ0| over the whole model), the Jaccard
    overlaps of the cores, the task groups (Jaccard >= tau) and their stage order.
    """
    setup_logging(verbose, quiet)
    from cpi_merge.analysis import analyze
    from cpi_merge.summary import format_summary

    plan = analyze(
        recipe,
        out_dir,
        seed=seed,
        order=order,
        strategy=strategy,
        memory_budget=parse_size(memory_budget) if memory_budget else None,
        force=force,
        progress=not quiet,
        allow_pickle=allow_pickle,
        plots=not no_plots,
    )
    if not quiet:
        click.echo(format_summary(plan))
        written = ["cpi_plan.json"] + ([] if no_plots else ["jaccard.png", "core_map.png"])
        click.echo(f"\nWrote {', '.join(f'{out_dir}/{w}' for w in written)}")


if __name__ == "__main__":
    main()
