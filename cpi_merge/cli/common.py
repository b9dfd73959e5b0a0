"""What every command shares: logging set-up, size parsing, turning errors into messages."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from cpi_merge.errors import CpiError

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``512M``, ``8G``, ``1.5T`` or a plain byte count.

    Raises:
        click.BadParameter: Not a size.

    """
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 512M, 8G or 1073741824") from None
    if size <= 0:
        raise click.BadParameter(f"{text!r}: size must be positive")
    return size


def setup_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv."""
    level = (
        logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


INTERRUPTED = (
    "interrupted: stopped before the output was complete; nothing that looks finished was "
    "written (an earlier output is untouched)"
)


def report_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print a :class:`CpiError` as one clean message (no traceback) and exit with status 2.

    Ctrl-C (at any moment, imports included) prints one line and exits with status 130.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CpiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            sys.exit(130)

    return wrapper


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return parse_size(value) if value else None


ANALYSIS_FIELDS = ("seed", "order", "strategy", "memory_budget", "energy_curve")


def analysis_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that runs the analysis (and writes a folder).

    The command receives ``force``, ``allow_pickle`` and ``analysis``: a dict of
    :class:`~cpi_merge.analysis.run.AnalysisOptions` fields.
    """

    @functools.wraps(func)
    def collect(*args: Any, **kwargs: Any) -> Any:
        kwargs["analysis"] = {name: kwargs.pop(name) for name in ANALYSIS_FIELDS}
        return func(*args, **kwargs)

    options = [
        click.option("--force", is_flag=True, help="Replace a non-empty output folder."),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            help="Seed of the random stage order (which group of tasks consolidation trains "
            "first; recorded in the plan). Not mergekit's --random-seed, which seeds "
            "mergekit's own random numbers (cpi's fusion draws none), and not the recipe's "
            "tie_seed (the tie rule's hash).",
        ),
        click.option(
            "--order",
            type=click.Choice(["random", "given"]),
            default="random",
            show_default=True,
            help="Stage order: seeded random (the paper) or recipe order.",
        ),
        click.option(
            "--strategy",
            type=click.Choice(["auto", "buffer", "histogram"]),
            default="auto",
            show_default=True,
            help="Analysis strategy, both exact. buffer: one pass, ~48 B per core entry per "
            "task; histogram: two passes (more under heavy ties), memory bounded by "
            "--memory-budget; auto: buffer when it fits "
            "--memory-budget.",
        ),
        click.option(
            "--memory-budget",
            default=None,
            metavar="SIZE",
            callback=_size_option,
            help="Memory the buffer strategy may use, e.g. 8G (default: 40% of RAM).",
        ),
        click.option(
            "--energy-curve",
            is_flag=True,
            help="Also measure each task's exact energy curve (how much of the update its "
            "largest entries hold, at 0.1%-50% of the entries) for the plan and "
            "diagnostics.png. Slower: a histogram per task on the first pass.",
        ),
        click.option(
            "--allow-pickle",
            is_flag=True,
            help="Accept pytorch_model.bin checkpoints (pickle can run code: trusted files only).",
        ),
    ]
    for option in reversed(options):
        collect = option(collect)
    return collect
