"""Remembered SHA-256 digests of input files: an unchanged checkpoint is hashed once.

SHA-256 runs at ~1.7 GB/s on one core, so the manifest's digests of a 7B merge's inputs
(base + 3 tasks, ~56 GB) cost ~30 CPU-seconds on every run, though users re-run merges
on the same checkpoints (another ``core_fraction``, another ω) far more often than they
change them. Like git's index, a digest is reused when the file's identity and status
are unchanged since it was hashed: same device, inode, size, modification time *and*
status-change time (``ctime``, which no user call can set back: any write, rename onto
the path, ``touch`` or ``chmod`` changes it).

A file whose ``ctime`` was less than :data:`SETTLED_NS` before its hashing started is not
remembered (git's "racily clean" case: a write within the timestamp granularity of the
read could leave every field unchanged). Nothing else is trusted: a digest is only
recorded from a hash of the whole file, with the same status before and after.

The memo is one small JSON file (``$CPI_MERGE_CACHE_DIR`` or
``$XDG_CACHE_HOME/cpi-merge``, default ``~/.cache/cpi-merge``), written atomically; a
missing, unreadable or foreign one (another format, another owner, writable by others)
is treated as empty, and bad entries are dropped. The manifest marks each remembered
digest (``"remembered": <when it was hashed>``). ``cpi-merge --rehash`` hashes every
input from its bytes: use it on a network file system whose attribute cache can hide
another machine's writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

SETTLED_NS = 2_000_000_000
"""A file changed less than this before its hash started is not remembered."""
MAX_ENTRIES = 4096
"""Older entries beyond this many are dropped (a few hundred KB of JSON)."""
_FORMAT = "cpi-merge digest memo 1"


def memo_path() -> Path:
    """Where the memo lives (``$CPI_MERGE_CACHE_DIR``, else the XDG cache folder)."""
    root = os.environ.get("CPI_MERGE_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "cpi-merge")
    return Path(root) / "input_digests.json"


def file_status(st: os.stat_result) -> list[int]:
    """The fields that must all be unchanged for a remembered digest to be used."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestMemo:
    """Digests of whole files, by real path, valid while the file's status is unchanged.

    Args:
        path: The JSON file (default :func:`memo_path`).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else memo_path()
        # Not an absolute path (no home folder): no memo rather than one in the cwd.
        self.enabled = self.path.is_absolute()
        self._entries: dict[str, dict] | None = None
        self._new: dict[str, dict] = {}

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            try:
                if self.enabled and _trusted(self.path):
                    record = json.loads(self.path.read_text(encoding="utf-8"))
                    if isinstance(record, dict) and record.get("format") == _FORMAT:
                        files = record.get("files")
                        self._entries = {
                            k: v
                            for k, v in (files.items() if isinstance(files, dict) else [])
                            if isinstance(v, dict) and isinstance(v.get("hashed_at"), str)
                        }
            except (OSError, ValueError):
                pass
        return self._entries

    def lookup(self, path: str | os.PathLike, st: os.stat_result) -> dict | None:
        """The remembered digest of this file, if its status is the one it was hashed with.

        Args:
            path: The file.
            st: Its status now.

        Returns:
            ``{"bytes", "sha256", "remembered"}`` (when it was hashed, UTC), or None.
        """
        entry = self._load().get(os.path.realpath(path))  # dicts with a hashed_at only
        if entry is None or entry.get("status") != file_status(st):
            return None
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            return None
        return {"bytes": st.st_size, "sha256": digest, "remembered": entry["hashed_at"]}

    def remember(
        self, path: str | os.PathLike, digest: dict, before: os.stat_result, started_ns: int
    ) -> bool:
        """Keep a digest hashed from the file's bytes, if the file is settled and unchanged.

        Args:
            path: The file.
            digest: Its ``{"bytes", "sha256"}``.
            before: Its status when the hashing started.
            started_ns: ``time.time_ns()`` when the hashing started.

        Returns:
            Whether it will be remembered (on :meth:`save`).
        """
        try:
            now = os.stat(path)
        except OSError:
            return False
        status = file_status(before)
        if (
            file_status(now) != status
            or digest.get("bytes") != before.st_size
            or before.st_ctime_ns > started_ns - SETTLED_NS
        ):
            return False
        hashed_at = datetime.fromtimestamp(started_ns / 1e9, tz=timezone.utc)
        self._new[os.path.realpath(path)] = {
            "status": status,
            "sha256": digest["sha256"],
            "hashed_at": hashed_at.isoformat(timespec="seconds"),
        }
        return True

    def save(self) -> None:
        """Merge what was remembered into the memo file (best effort: errors are ignored).

        The file is read again first, so two merges at once lose nothing but, at worst,
        each other's newest entries (those files are then hashed once more).
        """
        if not self._new or not self.enabled:
            return
        self._entries = None
        entries = {**self._load(), **self._new}
        if len(entries) > MAX_ENTRIES:
            newest = sorted(entries, key=lambda k: entries[k]["hashed_at"])
            entries = {k: entries[k] for k in newest[-MAX_ENTRIES:]}
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": _FORMAT, "files": entries}, f, indent=0)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return
        self._entries, self._new = entries, {}


def _trusted(path: Path) -> bool:
    """Whether the memo file exists, is this user's, and is writable by no other."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return owner_ok and not st.st_mode & 0o022
