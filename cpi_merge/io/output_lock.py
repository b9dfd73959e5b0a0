"""One run per output folder: an advisory lock beside it, released when the process ends.

``OUT`` is locked through ``.OUT.lock`` (``flock``: the kernel releases it if the
process is killed, so a crash never leaves a stale lock). A second run into the same
output fails at once with the first one's process id instead of racing it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cpi_merge.errors import OutputError


class OutputLock:
    """The lock of one output folder (hold it with ``with``)."""

    def __init__(self, out: Path, *, what: str = "output"):
        self.path = out.parent / f".{out.name}.lock"
        self.out = out
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock.

        Raises:
            OutputError: Another process holds it (named by its pid), or the folder that
                would hold the lock file cannot be written.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {str(self.path.parent)!r}: {exc.strerror}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot write beside the {self.what} {str(self.out)!r} "
                    f"({self.path.parent}: {exc.strerror}); choose a writable location"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"another run (process {holder}) is writing the {self.what} "
                    f"{str(self.out)!r}; wait for it to finish or choose another folder"
                ) from None
            # The file may have been unlinked by the previous holder after we opened it.
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
