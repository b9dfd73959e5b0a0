"""Running a command in a subprocess and stopping it at a named point (cpi_merge.faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MERGE = [sys.executable, "-m", "cpi_merge.cli.merge"]
CONSOLIDATE = [sys.executable, "-m", "consolidation.cli"]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run to the end; stdout and stderr captured as text."""
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )


class Paused:
    """A command started in the background and held at ``point`` once it gets there."""

    def __init__(self, cmd: list[str], point: str, marker: Path, **env: str):
        self.marker = marker
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CPI_PAUSE_AT": point, "CPI_PAUSE_MARKER": str(marker), **env},
        )
        deadline = time.monotonic() + 300
        while not marker.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"ended before reaching {point}:\n{out}\n{err}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"never reached {point}")
            time.sleep(0.05)
        self.pid = self.proc.pid

    def kill(self) -> None:
        """SIGKILL: what a crash, the OOM killer or a pulled plug does."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.communicate()

    def go_on(self) -> subprocess.CompletedProcess:
        """Let it continue to the end."""
        self.marker.with_name(self.marker.name + ".go").write_text("go")
        out, err = self.proc.communicate(timeout=600)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
