"""Peak resident memory of a process and all its descendants together.

``wait4`` reports the largest single process's peak (``ru_maxrss``), not the sum: a
command that forks a helper (``cpi-merge``'s analysis runs in a forked child while it
imports mergekit) would look smaller than it is. :class:`TreeMemory` samples the summed
``VmRSS`` of the process tree every 50 ms; the benchmarks report the larger of the two.
Pages a fork shares between parent and child are counted in both: an overestimate. The
tree is found through ``/proc/PID/task/TID/children`` (Linux with
``CONFIG_PROC_CHILDREN``, as on common distributions); without it only the root counts.
"""

from __future__ import annotations

import threading
from pathlib import Path

PERIOD_S = 0.05


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    """The summed resident memory (KiB) of ``pid`` and its descendants, now."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _rss_kib(p)
        todo += _children(p)
    return total


class TreeMemory:
    """Sample a process tree's summed RSS in a thread until :meth:`stop`.

    Args:
        pid: The tree's root (the command the benchmark started).
    """

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))

    def stop(self) -> float:
        """Stop sampling; the peak in MiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024
