"""Named points where the fault-injection tests stop a run; no effect in normal use.

When the environment variable ``CPI_PAUSE_AT`` names a point the run reaches, the process
writes its pid to the file ``CPI_PAUSE_MARKER`` and waits until ``<marker>.go`` exists:
a test can then SIGKILL it exactly there (not after a guessed delay), or change the world
around it and let it go on. A child that works for the run (the forked analysis) writes
the run's pid (:data:`RUN_PID`): the test stops the run, not a helper of it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

RUN_PID: int | None = None
"""The pid a pause reports: None for this process's own (set in a forked helper)."""


def pause_point(name: str) -> None:
    """Pause here if ``CPI_PAUSE_AT`` is ``name`` (see the module docstring)."""
    if os.environ.get("CPI_PAUSE_AT") != name:
        return
    marker = Path(os.environ["CPI_PAUSE_MARKER"])
    partial = marker.with_name(marker.name + ".tmp")
    partial.write_text(str(RUN_PID or os.getpid()))
    os.replace(partial, marker)  # whoever sees the marker reads a whole pid
    go = marker.with_name(marker.name + ".go")
    while not go.exists():
        time.sleep(0.05)
