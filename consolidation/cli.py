"""``cpi-consolidate``: Stage 4 on a fused model, or ``probe`` for the Stage 1 fine-tunes.

    cpi-consolidate CONFIG.yml OUT_DIR          # masked multi-stage fine-tune
    cpi-consolidate probe CONFIG.yml OUT_DIR    # one short fine-tune of θ0 per task

Both run under ``accelerate launch`` / ``torchrun`` with several processes.
"""

from __future__ import annotations

import click

from cpi_merge.cli.common import report_errors, setup_logging


class _DefaultToRun(click.Group):
    """A group whose first argument, when it is not a subcommand, means ``run``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _common(func):
    func = click.option("-v", "--verbose", count=True, help="More logging.")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")(func)
    func = click.option(
        "--resume",
        is_flag=True,
        help="Continue an interrupted run from its last complete checkpoint.",
    )(func)
    func = click.option(
        "--force",
        is_flag=True,
        help="Replace a non-empty OUT_DIR and discard an earlier run's work.",
    )(func)
    func = click.argument("out_dir", type=click.Path(file_okay=False))(func)
    return click.argument("config", type=click.Path(dir_okay=False))(func)


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Consolidate a fused model (Stage 4), or run the per-task probes (Stage 1)."""


@main.command("run")
@_common
@report_errors
def run(config, out_dir, force, resume, quiet, verbose):
    """Masked multi-stage fine-tune of a fused model (the default command)."""
    setup_logging(verbose, quiet)
    from consolidation.stages import consolidate
    from consolidation.training.distributed import is_main_process

    records = consolidate(config, out_dir, force=force, resume=resume, progress=not quiet)
    if is_main_process() and not quiet:
        for r in records:
            click.echo(
                f"stage {r.index}: {', '.join(r.tasks)} | frozen {r.frozen_entries:,} | "
                f"steps {r.steps} | loss {r.first_loss} -> {r.last_loss}"
            )
        click.echo(f"Wrote the consolidated model to {out_dir}")


@main.command("probe")
@_common
@report_errors
def probe(config, out_dir, force, resume, quiet, verbose):
    """One short fine-tune of the base model per task, plus a cpi recipe over them."""
    setup_logging(verbose, quiet)
    from consolidation.probe import RECIPE_FILE, run_probes
    from consolidation.training.distributed import is_main_process

    results = run_probes(config, out_dir, force=force, resume=resume, progress=not quiet)
    if is_main_process() and not quiet:
        for task, r in results.items():
            click.echo(
                f"probe {task}: {r['steps']} steps, loss {r['first_loss']} -> "
                f"{r['last_loss']}, |Δ|/|θ0| {r['relative_update_norm']:.3e}"
            )
        click.echo(f"Wrote the probes and {out_dir}/{RECIPE_FILE}")


if __name__ == "__main__":
    main()
