"""Write an output folder so that it appears only when complete, and never clobbers by accident.

Everything is written into a hidden sibling ``.<name>.partial-<pid>`` on the same
filesystem and renamed into place at the end. A failed run removes its partial folder
and leaves any previous output untouched; a killed run leaves only the hidden partial
folder, which nothing mistakes for a result.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cpi_merge.errors import OutputError


def check_output_location(
    out_dir: str | os.PathLike, *, force: bool, inputs: Iterable[str]
) -> Path:
    """Refuse an output that would overwrite or sit inside something it must not.

    Args:
        out_dir: The requested output folder.
        force: Allow replacing an existing non-empty folder.
        inputs: Local folders read by the run (the output may not be inside one, nor
            contain one).

    Returns:
        The absolute output path.

    Raises:
        OutputError: The output is a file, a non-empty folder without ``force``, or
            inside / around an input.

    """
    out = Path(out_dir).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputError(
                f"output {str(out)!r} overlaps the input folder {str(src)!r}; "
                "write the output somewhere else"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(
            f"output folder {str(out)!r} exists and is not empty; pass --force to replace it"
        )
    return out


@contextmanager
def staged_output(
    out_dir: str | os.PathLike, *, force: bool = False, inputs: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out_dir`` only if the block succeeds.

    Args:
        out_dir: Final location.
        force: Replace an existing non-empty folder.
        inputs: Folders the run reads (see :func:`check_output_location`).

    Yields:
        The temporary folder to write into.

    Raises:
        OutputError: See :func:`check_output_location`.

    """
    out = check_output_location(out_dir, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
