"""Start ``cpi-merge``'s analysis before mergekit is imported (it then runs beside the import).

The full command line can only be parsed once mergekit is imported (its options are
part of it), and importing it takes seconds. :func:`start_merge_ahead` reads the command
line as far as the analysis needs it (recipe, output, ``--force``, ``--allow-pickle``,
the analysis options, ``--quiet``, ``-v``, ``-j``), does what the merge does first (reserve the
output, open and check the models, check the free space: nothing is read before the
output is known to be writable), then starts the analysis in a forked child
(:mod:`cpi_merge.analysis.forked`). :func:`cpi_merge.commands.merge` takes the result
only if its own, fully parsed arguments match (:meth:`MergeAhead.matches`); otherwise it
drops it and runs everything itself. Nothing changes in what is computed or written.

Not started (the merge then runs as before) where no core is free for it during the
import (two cores, and the inputs' SHA-256 keeps the second one busy: inputs held for
the analysis's read, more than :data:`HASHED_DURING_IMPORT` of them not remembered from
an earlier run), for Hub or LoRA references, recipes that give every core, ``--help``,
command lines it does not read with certainty, and where forking is not allowed
(:func:`~cpi_merge.analysis.forked.fork_allowed`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import ExitStack
from pathlib import Path

import click

from cpi_merge.analysis.forked import (
    ForkedAnalysis,
    fork_allowed,
    start_forked_analysis,
    usable_cores,
)
from cpi_merge.analysis.run import Analysis, AnalysisOptions
from cpi_merge.cli.common import analysis_options, setup_logging
from cpi_merge.config.recipe import CpiRecipe, load_recipe
from cpi_merge.errors import CpiError
from cpi_merge.fusion.recipe_for_mergekit import recipe_boundaries
from cpi_merge.io.lora import is_lora
from cpi_merge.io.manifest import Manifest
from cpi_merge.io.opened import OpenedModels, open_models, recipe_folders
from cpi_merge.io.output_dir import Reservation, reserved_output

LOG = logging.getLogger(__name__)


class _NotForked(Exception):
    """The process could not fork: the merge runs the analysis itself."""


@dataclasses.dataclass(frozen=True)
class Started:
    """What the small ``cpi-merge`` entry point hands the full command (click's ``obj``)."""

    manifest: Manifest
    ahead: MergeAhead | None = None


@click.command(
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("recipe")
@click.argument("out_path")
@analysis_options
@click.option("--quiet/--no-quiet", default=False)
@click.option("-v", "verbosity", count=True)
@click.option("-j", "--num-threads", "num_threads", type=int, default=None)
@click.option("--no-checksums", is_flag=True)
def _read(**values):
    return values


def read_command_line(args: list[str]) -> dict | None:
    """The values the analysis depends on, or None if the command line is not read with certainty.

    The recipe and the output must come first (other options may take values that a
    partial reading could take for them); mergekit's options are skipped.
    """
    if len(args) < 2 or not args[0].endswith((".yml", ".yaml")) or args[1].startswith("-"):
        return None
    if any(a in ("-h", "--help") or a.startswith("--lora-merge") for a in args):
        return None
    try:
        return _read.main(args=list(args), standalone_mode=False)
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        return None


class MergeAhead:
    """The output reserved, the models opened, the analysis running in a child.

    Attributes:
        recipe: The recipe path as given.
        out_dir: The output folder as given.
        force: ``--force``.
        allow_pickle: ``--allow-pickle``.
        settings: The analysis options the child runs with.
        out: The output's reservation.
        opened: The opened, checked models.
        analysis: The child.
        stack: Releases everything (the child, the hashing hold, the reservation); the
            merge runs inside it, so that its errors pass through the reservation.
    """

    def __init__(self, values: dict, recipe: CpiRecipe, manifest: Manifest) -> None:
        self.recipe, self.out_dir = values["recipe"], values["out_path"]
        self.force, self.allow_pickle = values["force"], values["allow_pickle"]
        self.settings = AnalysisOptions(progress=not values["quiet"], **values["analysis"])
        self.stack = ExitStack()
        self._follow = ExitStack()
        with self.stack:  # released at once if anything below fails
            self.out: Reservation = self.stack.enter_context(
                reserved_output(self.out_dir, force=self.force, inputs=recipe_folders(recipe))
            )
            self.opened: OpenedModels = open_models(recipe, allow_pickle=self.allow_pickle)
            from cpi_merge.commands import expected_output_bytes

            self.out.require(expected_output_bytes(self.opened))
            readers = [self.opened.base, *self.opened.tasks]
            manifest.hash_inputs((f for _, _, f in self.opened.sources()), hold=True)
            # Following before the fork: no read the child reports can come too early.
            self.stack.callback(self._follow.close)
            names = [t.name for t in self.opened.tensors]
            self._follow.enter_context(manifest.following(readers, names))
            forked = start_forked_analysis(
                self.opened,
                self.settings,
                pictures=self.out.partial,
                max_threads=values["num_threads"],
            )
            if forked is None:
                raise _NotForked
            self.analysis: ForkedAnalysis = forked
            self.stack.callback(self.analysis.abandon)
            self.stack = self.stack.pop_all()

    def matches(
        self, recipe, out_dir, *, force: bool, allow_pickle: bool, settings: AnalysisOptions
    ) -> bool:
        """Whether the fully parsed arguments are the ones this analysis was started with."""
        same_settings = dataclasses.replace(settings, progress=self.settings.progress)
        return (
            isinstance(recipe, str | os.PathLike)
            and Path(recipe).resolve() == Path(self.recipe).resolve()
            and Path(out_dir).resolve() == Path(self.out_dir).resolve()
            and (force, allow_pickle) == (self.force, self.allow_pickle)
            and same_settings == self.settings
        )

    def imported(self) -> None:
        """Say that mergekit is imported: the child may use every core now."""
        self.analysis.imported()

    def result(self) -> Analysis:
        """Wait for the child's analysis (its error is raised here); ends the hashing hold."""
        try:
            return self.analysis.result()
        finally:
            self._follow.close()

    def pictures_drawn(self) -> bool:
        """Whether the analysis process drew the plan's pictures into the output (it waits)."""
        return self.analysis.pictures_drawn()

    def close(self) -> None:
        """Release everything that is still held (no-op once the merge has run inside)."""
        self.stack.close()


HASHED_DURING_IMPORT = 8 << 30
"""Input bytes whose SHA-256 (~2 GB/s on one core) ends within mergekit's import (~4 s)."""


def _core_to_spare(folders: list[str], manifest: Manifest) -> bool:
    """Whether a core is free for the child while the parent imports mergekit.

    The import takes one core. The inputs' SHA-256 takes none from it when it runs at
    low priority (:meth:`Manifest.yields_cpu`: 2B, first merge, 4 interleaved rounds:
    39.8 s forked vs 47.8 s not). Held inputs (larger than the page cache) are hashed
    behind the analysis's read at normal priority: on two cores that takes the other
    core until it is done, and the child only gets in the way (2B, 3 rounds: 50.3 s
    forked vs 46.1 s not; without the hashes 32.7 s vs 39.2 s), unless little is left
    to hash.
    """
    if usable_cores() >= 3 or not manifest.enabled or manifest.yields_cpu(folders):
        return True
    try:
        size = manifest.bytes_to_hash(folders)  # digests remembered from earlier runs: none
    except OSError:  # the merge reports what is wrong with the folders
        return False
    return size <= HASHED_DURING_IMPORT


def start_merge_ahead(args: list[str], manifest: Manifest) -> MergeAhead | None:
    """Reserve the output, open the models and fork the analysis, when that is certain to help.

    Args:
        args: The command line after ``cpi-merge``.
        manifest: The manifest hashing the inputs.

    Returns:
        The started merge, or None (the merge then does everything itself).

    Raises:
        CpiError: The output cannot be reserved or the models cannot be opened (the same
            errors the merge would raise, only earlier).
    """
    values = read_command_line(args)
    if values is None or not fork_allowed():
        return None
    try:
        recipe = load_recipe(values["recipe"])
    except CpiError:  # the command reports it, properly
        return None
    refs = [recipe.base_model] + [m.model for m in recipe.models]
    local = all(Path(r).is_dir() for r in refs)  # no Hub look-up before the full parse
    if not local or any(map(is_lora, refs)) or recipe_boundaries(recipe) is not None:
        return None
    if not _core_to_spare(refs, manifest):
        return None
    setup_logging(values["verbosity"], values["quiet"])
    try:
        ahead = MergeAhead(values, recipe, manifest)
    except _NotForked:
        return None
    LOG.info("the analysis runs in process %d while mergekit is imported", ahead.analysis.pid)
    return ahead
