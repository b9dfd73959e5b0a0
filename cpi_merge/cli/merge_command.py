"""The full ``cpi-merge`` command: analysis + mergekit's merge, every mergekit option kept.

Started by :mod:`cpi_merge.cli.merge` (which hands it the input-hashing manifest and the
analysis it may have started as the click context object); runnable on its own too.
"""

from __future__ import annotations

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from cpi_merge.cli.common import analysis_options, report_errors, setup_logging
from cpi_merge.cli.merge_ahead import Started


@click.command(
    "cpi-merge", cls=PrettyPrintHelp, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@analysis_options
@click.option(
    "--no-checksums", is_flag=True, help="Skip SHA-256 of inputs and outputs in cpi_manifest.json."
)
@click.option(
    "--rehash",
    is_flag=True,
    help="Hash every input file from its bytes, even one whose SHA-256 an earlier run "
    "remembered (same file, size, mtime and ctime).",
)
@add_merge_options
@click.pass_obj
@report_errors
def command(
    started: Started | None,
    merge_options: MergeOptions,
    recipe,
    out_path,
    force,
    allow_pickle,
    analysis,
    no_checksums,
    rehash,
):
    """Merge the models of RECIPE (a `merge_method: cpi` recipe) into OUT_PATH.

    Runs the core analysis unless every task has a core_threshold, then mergekit's own
    merge with the cpi method: core entries are copied from their task, the rest is
    SLERP-fused. OUT_PATH is a Hugging Face model folder plus cpi_plan.json.
    """
    setup_logging(merge_options.verbosity, merge_options.quiet)
    merge_options.apply_global_options()
    from cpi_merge.commands import merge
    from cpi_merge.report.summary import format_summary

    result = merge(
        recipe,
        out_path,
        options=merge_options,
        force=force,
        allow_pickle=allow_pickle,
        checksums=not no_checksums,
        rehash=rehash,
        manifest=started.manifest if started else None,
        ahead=started.ahead if started else None,
        **analysis,
    )
    if not merge_options.quiet:
        click.echo(format_summary(result.plan))
        click.echo(f"\nWrote the merged model to {result.out_dir}")


if __name__ == "__main__":
    command()
