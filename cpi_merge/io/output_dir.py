"""Write an output folder so that it appears only when complete, and never clobbers by accident.

Before any tensor is read, the output is *reserved*: its location is checked (not a
file, not inside an input, not a non-empty folder without ``force``), it is locked for
this run (:mod:`cpi_merge.io.output_lock`), leftovers of killed runs beside it are
removed, the hidden staging folder ``.<name>.partial-<pid>`` is created on the same
filesystem (so an unwritable location fails at once) and, when the run knows how much
it will write, the free space is checked. Everything is written into the staging folder
and renamed into place at the end; a folder that appeared at ``OUT`` meanwhile is never
replaced without ``force``. A failed run removes its staging folder and leaves any
previous output untouched; a full disk is one line naming the path and the space needed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from cpi_merge.errors import OutputError
from cpi_merge.io.output_lock import OutputLock

LOG = logging.getLogger(__name__)
SPACE_MARGIN = 1.02
"""The free space asked for: the expected size plus 2% (file headers, rounding)."""


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


def _leftovers(out: Path) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-\d+$")
    if not out.parent.is_dir():
        return []
    return [p for p in out.parent.iterdir() if pattern.match(p.name)]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def _no_space(exc: BaseException) -> bool:
    """A full disk, as Python (``ENOSPC``) or safetensors' Rust writer (os error 28) says it."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc) or "os error 28" in str(exc)


@dataclass
class Reservation:
    """An output reserved for this run: its final path and the staging folder."""

    out: Path
    partial: Path
    force: bool
    needed: int

    def commit(self) -> None:
        """Rename the staging folder into place.

        Raises:
            OutputError: A non-empty folder appeared at the output during the run and
                ``force`` was not given (the staging folder is then removed).
        """
        out, old = self.out, None
        if out.exists():
            if out.is_dir() and any(out.iterdir()):
                if not self.force:
                    raise OutputError(
                        f"output folder {str(out)!r} appeared while this run was writing; "
                        "it was left as it is and nothing was written (pass --force to "
                        "replace it)"
                    )
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
            elif out.is_dir():
                out.rmdir()
        os.replace(self.partial, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def require(self, needed: int) -> None:
        """Check, before anything is written, that ``needed`` bytes fit on the device.

        Raises:
            OutputError: Not enough free space (naming both sizes).
        """
        self.needed = needed
        free = shutil.disk_usage(self.partial).free
        if needed and free < needed * SPACE_MARGIN:
            raise OutputError(
                f"not enough free space for {str(self.out)!r}: it needs about {_size(needed)}, "
                f"{_size(free)} are free on that device"
            )

    def no_space(self, exc: BaseException) -> OutputError:
        """The one-line error for a full disk while writing."""
        need = f"about {_size(self.needed)}" if self.needed else "more space"
        where = getattr(exc, "filename", None) or self.partial
        return OutputError(
            f"no space left on the device while writing {str(self.out)!r} ({where}); the "
            f"output needs {need}: free some space or choose another location. Nothing was "
            "written"
        )


@contextmanager
def reserved_output(
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str] = (),
    needed: int = 0,
    locked: bool = False,
) -> Iterator[Reservation]:
    """Reserve ``out_dir`` for this run (see the module docstring); release it at the end.

    The block writes into ``reservation.partial`` and calls ``reservation.commit()``
    when done; whatever is left of the staging folder is removed on the way out.

    Args:
        out_dir: Final location.
        force: Replace an existing non-empty folder.
        inputs: Folders the run reads (see :func:`check_output_location`).
        needed: Bytes the output will take (0: unknown, no space check).
        locked: The caller already holds the output's lock (a long run that reserved the
            output when it started).

    Raises:
        OutputError: Unsafe location, another run holds it, not writable, or too little
            free space; a full disk while writing (``ENOSPC``) becomes one too.
    """
    out = check_output_location(out_dir, force=force, inputs=inputs)
    with nullcontext() if locked else OutputLock(out):
        for stale in _leftovers(out):  # we hold the lock: no live run owns these
            LOG.warning("removing %s, left by a run that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        try:
            partial.mkdir()
        except OSError as exc:
            raise OutputError(
                f"cannot write the output {str(out)!r}: {exc.strerror} ({partial.parent})"
            ) from None
        reservation = Reservation(out, partial, force, needed)
        try:
            reservation.require(needed)
            yield reservation
        except Exception as exc:
            if _no_space(exc):
                raise reservation.no_space(exc) from None
            raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def staged_output(
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str] = (),
    needed: int = 0,
    locked: bool = False,
) -> Iterator[Path]:
    """Yield a staging folder that replaces ``out_dir`` only if the block succeeds.

    :func:`reserved_output` (same arguments) and its commit in one block.

    Yields:
        The staging folder to write into.

    Raises:
        OutputError: See :func:`reserved_output` and :meth:`Reservation.commit`.
    """
    with reserved_output(
        out_dir, force=force, inputs=inputs, needed=needed, locked=locked
    ) as reservation:
        yield reservation.partial
        reservation.commit()
