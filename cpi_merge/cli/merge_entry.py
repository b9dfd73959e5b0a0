"""The ``cpi-merge`` console entry point: start hashing the inputs, then run the command.

Importing mergekit (torch, transformers, peft) takes seconds on one core. The SHA-256
of the input checkpoints for the manifest does not depend on anything mergekit does, so
the entry point reads the recipe named on the command line first (best effort: anything
unexpected is left to the real command, which reports it) and starts hashing its local
folders in the background; :func:`cpi_merge.checksums.folder_digests` picks the results
up later, or hashes again if a file changed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def local_inputs(argv: Sequence[str]) -> list[str]:
    """The local model folders of the recipe named in ``argv``, when it can be told cheaply.

    Args:
        argv: The command-line arguments (without the program name).

    Returns:
        Folders to hash; empty for ``--help``, ``--no-checksums`` or no readable recipe.
    """
    if any(a in ("--help", "-h", "--no-checksums") for a in argv):
        return []
    recipe = next((a for a in argv if a.endswith((".yml", ".yaml")) and Path(a).is_file()), None)
    if recipe is None:
        return []
    from cpi_merge.recipe import load_recipe

    try:
        parsed = load_recipe(recipe)
    except Exception:  # noqa: BLE001 - the command itself reports a bad recipe, properly
        return []
    refs = [parsed.base_model] + [m.model for m in parsed.models]
    return [r for r in refs if Path(r).is_dir()]


def run() -> None:
    """Start hashing the recipe's local inputs in the background, then run ``cpi-merge``."""
    from cpi_merge.checksums import start_background

    start_background(local_inputs(sys.argv[1:]))
    from cpi_merge.cli.merge import main

    main()
