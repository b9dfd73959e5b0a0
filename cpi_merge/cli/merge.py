"""The ``cpi-merge`` console entry point: parse the command line, start hashing, then merge.

Importing mergekit (torch, transformers, peft) takes seconds on one core. The SHA-256 of
the input checkpoints for the manifest does not depend on anything mergekit does, so
this small command parses the command line first (without mergekit's options: they are
handed on untouched), creates the :class:`~cpi_merge.io.manifest.Manifest` and starts
hashing the recipe's local folders in the background, starts the analysis in a forked
child where it can (:mod:`cpi_merge.cli.merge_ahead`), and only then imports the full
command (:mod:`cpi_merge.cli.merge_command`), which parses everything again with
mergekit's options and receives the manifest. When the merge will run the analysis, the
checkpoints are held until it reads them (one disk read for both, see
:meth:`~cpi_merge.io.manifest.Manifest.following`); the other files are hashed at once.
Early hashing is best effort: when the recipe is not the first argument, or cannot be
read, the merge hashes its inputs itself. Input files whose digests an earlier run
remembered, unchanged since, are not hashed at all (:mod:`cpi_merge.io.digest_memo`;
``--rehash`` turns that off).

``cpi-merge verify OUT`` checks an output against its manifest (exit status 1 on any
difference).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cpi_merge.cli.common import report_errors


def local_inputs(recipe: str | None) -> tuple[list[str], bool]:
    """The local model folders of a recipe file, when it can be read cheaply (else none).

    Returns:
        The folders, and whether the merge runs the analysis (some task has no
        ``core_threshold``): then their checkpoints are hashed behind its read.
    """
    if not recipe or not recipe.endswith((".yml", ".yaml")) or not Path(recipe).is_file():
        return [], False
    from cpi_merge.config.recipe import load_recipe
    from cpi_merge.errors import CpiError

    try:
        parsed = load_recipe(recipe)
    except CpiError:  # the command itself reports a bad recipe, properly
        return [], False
    refs = [parsed.base_model] + [m.model for m in parsed.models]
    analysed = all(m.parameters.core_threshold is None for m in parsed.tasks)
    return [r for r in refs if Path(r).is_dir()], analysed


def _verify(out: str | None) -> None:
    """``cpi-merge verify OUT``: re-hash what cpi_manifest.json lists; exit 1 on a difference."""
    from cpi_merge.errors import OutputError
    from cpi_merge.io.manifest import verify_output

    if not out:
        raise OutputError("usage: cpi-merge verify OUT (a folder written by cpi-merge)")
    checked, differences = verify_output(out)
    if differences:
        click.echo(f"{out}: {len(differences)} difference(s) from cpi_manifest.json:", err=True)
        for line in differences:
            click.echo(f"  - {line}", err=True)
        sys.exit(1)
    click.echo(f"{out}: all {checked} files match cpi_manifest.json")


@click.command(
    "cpi-merge",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("recipe", required=False)
@click.argument("out_path", required=False)
@click.option("--no-checksums", is_flag=True)
@click.option("--rehash", is_flag=True)
@click.option("-h", "--help", "show_help", is_flag=True)
@click.pass_context
@report_errors
def main(ctx: click.Context, recipe, out_path, no_checksums, rehash, show_help) -> None:
    """Start hashing RECIPE's inputs, then run the full ``cpi-merge`` command."""
    fresh = "torch" not in sys.modules  # a new process (not a test calling main in-process)
    from cpi_merge.io.digest_memo import DigestMemo
    from cpi_merge.io.manifest import Manifest

    if recipe == "verify" and not show_help:
        _verify(out_path)
        return
    manifest = Manifest(enabled=not no_checksums, memo=None if rehash else DigestMemo())
    args = [a for a in (recipe, out_path) if a is not None] + ctx.args
    args += ["--no-checksums"] * no_checksums + ["--rehash"] * rehash + ["--help"] * show_help
    ahead = None
    if not show_help:
        folders, analysed = local_inputs(recipe)
        manifest.hash_inputs(folders, hold=analysed)
        if analysed:
            from cpi_merge.analysis import forked
            from cpi_merge.cli.merge_ahead import start_merge_ahead

            if fresh:  # torch is imported now, and has run nothing
                forked.mark_fresh_process()
            ahead = start_merge_ahead(args, manifest)
    from cpi_merge.cli import merge_command
    from cpi_merge.cli.merge_ahead import Started

    try:
        merge_command.command.main(args=args, prog_name="cpi-merge", obj=Started(manifest, ahead))
    finally:
        if ahead is not None:  # the command stopped before the merge took it over
            ahead.close()


if __name__ == "__main__":
    main()
