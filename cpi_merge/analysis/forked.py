"""The analysis in a forked child process, so that it runs while the parent imports mergekit.

``cpi-merge`` needs both the analysis and mergekit; importing mergekit (torch,
transformers, peft) takes seconds of one core and shares nothing with the analysis. On a
machine with a core to spare :func:`start_forked_analysis` forks the process (after the
output is reserved and the models are opened and checked), runs
:func:`~cpi_merge.analysis.run.run_analysis` in the child and returns at once; the parent
imports mergekit meanwhile and then waits in :meth:`ForkedAnalysis.result`.

- The child uses one torch thread while the parent imports (more would spin on the core
  the import needs), and all of them (at most mergekit's ``-j``) once the parent calls
  :meth:`ForkedAnalysis.imported`, unless torch had started threads before the fork
  (OpenMP's do not survive it: the child then keeps to one).
- Each tensor the child has read is reported to the parent, which marks it read on its
  own checkpoints: the inputs' SHA-256 still follows the analysis' one disk read
  (:meth:`~cpi_merge.io.manifest.Manifest.following`).
- The result comes back through a pipe as JSON plus the core positions' raw bytes
  (:mod:`cpi_merge.analysis.analysis_wire`); every message is JSON (no pickle).
- An error of :mod:`cpi_merge.errors` in the child is raised again in the parent with the
  same type and message; any other is a one-line :class:`~cpi_merge.errors.CpiError`
  (its traceback is logged at debug level), and so is a child that dies without an
  answer (killed).
- The child dies with the parent (``PR_SET_PDEATHSIG``); leaving the parent's block early
  kills it (:meth:`ForkedAnalysis.abandon`).

Linux only (``fork`` plus ``prctl``): :func:`fork_allowed` says no elsewhere, with
``CPI_NO_FORK=1``, or with fewer than two usable cores; the caller then runs the
analysis itself, as it does when the fork fails.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Connection, Pipe
from pathlib import Path

from cpi_merge import errors, faults
from cpi_merge.analysis.analysis_wire import buffer_sizes, decode_analysis, encode_analysis
from cpi_merge.analysis.run import Analysis, AnalysisOptions, run_analysis
from cpi_merge.errors import CpiError
from cpi_merge.io.opened import OpenedModels

LOG = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
PICTURES_WAIT_S = 120.0
"""How long the parent waits for the child's pictures before drawing them itself."""


def _native_threads() -> int:
    """Threads of this process that Python did not start (torch's, OpenMP's...)."""
    try:
        return len(os.listdir("/proc/self/task")) - threading.active_count()
    except OSError:
        return -1


_FRESH_NATIVE: int | None = None


def mark_fresh_process() -> None:
    """Say that torch is imported but has computed nothing yet in this process.

    ``cpi-merge`` calls this at its start. OpenMP's worker threads, once started, do not
    survive a fork (a child that uses them hangs), so a forked child uses more than one
    thread only if no native thread has started since this call.
    """
    global _FRESH_NATIVE
    _FRESH_NATIVE = _native_threads()


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    for path, parse in (
        ("/sys/fs/cgroup/cpu.max", lambda t: t.split()),  # v2: "quota period" or "max ..."
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None),  # v1: -1 without a quota
    ):
        try:
            text = Path(path).read_text()
            if parse is not None:
                quota, period = parse(text)
            else:
                quota = text.strip()
                period = Path(path).with_name("cpu.cfs_period_us").read_text().strip()
        except (OSError, ValueError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            cores = min(cores, max(1, -(-int(quota) // int(period))))
        break
    return cores


def fork_allowed() -> bool:
    """Whether the analysis may run in a forked child here (Linux, 2 cores, not disabled)."""
    return (
        sys.platform == "linux"
        and os.environ.get("CPI_NO_FORK", "") in ("", "0")
        and usable_cores() >= 2
    )


class ForkedAnalysis:
    """A running child analysis (see the module docstring).

    Args:
        pid: The child's process id.
        results: The parent's end of the child's pipe.
        go: The parent's end of the pipe that tells the child the import is done.
        readers: The parent's checkpoints the child reads (base, then tasks), to mark
            each tensor the child has read.
    """

    def __init__(self, pid: int, results: Connection, go: Connection, readers) -> None:
        self.pid = pid
        self._results, self._go, self._readers = results, go, readers
        self._answer: tuple | None = None
        self._drawing = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="cpi-forked-analysis")
        self._thread.daemon = True
        self._thread.start()

    def _listen(self) -> None:
        """Relay the child's read reports until its answer (or its end) arrives."""
        try:
            while True:
                message = json.loads(self._results.recv_bytes())
                if message[0] == "read":
                    _, model, name = message
                    self._readers[model].mark_read(name)
                    continue
                if message[0] == "done":
                    header = self._results.recv_bytes()
                    buffers = [bytearray(size) for size in buffer_sizes(header)]
                    for buf in buffers:
                        self._results.recv_bytes_into(buf)
                    self._drawing = message[1]
                    message = ("done", decode_analysis(header, buffers))
                self._answer = tuple(message)
                return
        except (EOFError, OSError):
            self._answer = None
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._answer = ("error", "", f"{type(exc).__name__}: {exc}", "")
        finally:
            self._done.set()

    def imported(self) -> None:
        """Tell the child that the parent's import is done: it may use every core now."""
        try:
            self._go.send_bytes(b"go")
        except OSError:
            pass  # the child has ended already

    def result(self) -> Analysis:
        """Wait for the child and return its analysis (or raise its error).

        Raises:
            CpiError: The child's error (same type and message), or it died without an
                answer.
        """
        self.imported()
        waited = time.perf_counter()
        self._done.wait()
        LOG.debug("waited %.2f s for the forked analysis", time.perf_counter() - waited)
        self._thread.join()
        answer = self._answer
        if answer is not None and answer[0] == "done" and self._drawing:
            return answer[1]  # the child goes on drawing: see pictures_drawn()
        pid = self.pid
        status = self._reap(stop=_listener_failed(answer))
        if answer is None:
            raise CpiError(
                f"the analysis process ({pid}) ended without an answer ({status}); "
                "no output was written"
            )
        if answer[0] == "done":
            return answer[1]
        _, kind, message, trace = answer
        LOG.debug("the forked analysis failed:\n%s", trace)
        error = getattr(errors, kind, None)
        if isinstance(error, type) and issubclass(error, CpiError):
            try:
                raise error(message)
            except TypeError:  # a constructor that takes more than the message
                pass
        raise CpiError(f"the analysis failed: {kind or 'error'}: {message}")

    def pictures_drawn(self) -> bool:
        """Wait for the child to finish the plan's pictures; whether it drew them all.

        The child draws them after its answer only if the parent was still importing
        then (a core was free); else, if it failed, or if it takes longer than
        :data:`PICTURES_WAIT_S` (it is then stopped), the caller draws them.
        """
        drawing, self._drawing = self._drawing, False
        waited = time.perf_counter()
        status = ""
        while drawing and self.pid and time.perf_counter() < waited + PICTURES_WAIT_S:
            pid, code = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                status = self._ended(code)
                break
            time.sleep(0.02)
        if self.pid:  # not drawing, or still drawing after the wait: stopped
            status = self._reap(stop=True)
        LOG.debug("waited %.2f s for the pictures", time.perf_counter() - waited)
        if drawing and status != "exit status 0":
            LOG.warning("the analysis process did not draw the pictures (%s): drawn here", status)
        return drawing and status == "exit status 0"

    def abandon(self) -> None:
        """Stop the child (if still running) and wait for it; its result is dropped."""
        self._reap(stop=True)

    def _reap(self, *, stop: bool) -> str:
        """Wait for the child to end (after SIGKILL if ``stop``); how it ended."""
        if not self.pid:
            return "already reaped"
        if stop:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self._ended(os.waitpid(self.pid, 0)[1])

    def _ended(self, code: int) -> str:
        """The child has been reaped with wait status ``code``: release the pipes."""
        self.pid = 0
        self._thread.join()  # the pipe is at its end: the listener returns
        self._results.close()
        self._go.close()
        if os.WIFSIGNALED(code):
            return f"killed by signal {os.WTERMSIG(code)}"
        return f"exit status {os.waitstatus_to_exitcode(code)}"


def _listener_failed(answer: tuple | None) -> bool:
    """Whether the parent's listener failed (the child may still be writing: stop it)."""
    return answer is not None and answer[0] == "error" and answer[1] == ""


def start_forked_analysis(
    opened: OpenedModels,
    settings: AnalysisOptions,
    pictures: Path | None = None,
    max_threads: int | None = None,
) -> ForkedAnalysis | None:
    """Fork a child that runs the analysis of ``opened`` with ``settings``.

    Args:
        opened: The opened, checked models.
        settings: How to run the analysis.
        pictures: Where the child may draw the plan's pictures once its answer is sent
            (only while the parent is still importing: see :meth:`ForkedAnalysis.pictures_drawn`).
        max_threads: At most this many torch threads once the parent has imported
            (mergekit's ``-j``); default: torch's.

    Returns:
        The running child, or None if the process could not fork (the caller then runs
        the analysis itself).

    Call only when :func:`fork_allowed`. Unless :func:`mark_fresh_process` was called and
    no native thread has started since, the child keeps to one thread (slower, but it
    cannot hang in OpenMP).

    Returns:
        The running child; :meth:`ForkedAnalysis.result` waits for its analysis.
    """
    results_in, results_out = Pipe(duplex=False)
    go_in, go_out = Pipe(duplex=False)
    parent = os.getpid()
    readers = [opened.base, *opened.tasks]
    native = _native_threads()
    widen = _FRESH_NATIVE is not None and 0 <= native <= _FRESH_NATIVE
    if not widen:
        LOG.info("torch ran before the fork: the forked analysis keeps to one thread")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's
    try:
        with warnings.catch_warnings():  # Python 3.12+: fork beside the hashing threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError as exc:
        signal.signal(signal.SIGINT, previous)
        for end in (results_in, results_out, go_in, go_out):
            end.close()
        LOG.info("could not fork the analysis (%s): it runs here", exc)
        return None
    if pid:
        signal.signal(signal.SIGINT, previous)
        results_out.close()
        go_in.close()
        try:
            return ForkedAnalysis(pid, results_in, go_out, readers)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
    status = 0
    try:
        results_in.close()
        go_out.close()
        _child(opened, settings, readers, parent, results_out, go_in, widen, pictures, max_threads)
    except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
        status = 1
    finally:
        os._exit(status)


def _send(out: Connection, message: list) -> None:
    out.send_bytes(json.dumps(message).encode())


def _child(
    opened: OpenedModels,
    settings: AnalysisOptions,
    readers,
    parent: int,
    out: Connection,
    go: Connection,
    widen: bool,
    pictures: Path | None,
    max_threads: int | None,
) -> None:
    """The child's whole life: analyse, send the answer (or the error), return."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return
    faults.RUN_PID = parent  # the fault tests stop (and kill) the run, i.e. the parent
    import torch

    threads = torch.get_num_threads()
    if max_threads:
        threads = max(1, min(threads, max_threads))
    torch.set_num_threads(1)
    waiting = [widen]

    def report(model: int):
        def on_read(info) -> None:
            _send(out, ["read", model, info.name])
            if waiting[0] and go.poll():
                waiting[0] = False
                torch.set_num_threads(threads)

        return on_read

    for model, ckpt in enumerate(readers):
        ckpt.on_read = report(model)
    try:
        analysis = run_analysis(opened, settings, keep_cores=True)
        header, arrays = encode_analysis(analysis)
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
        _send(out, ["error", type(exc).__name__, str(exc), traceback.format_exc()])
        return
    plan = analysis.plan
    del analysis  # the core positions: the parent holds them now
    draw = pictures is not None and not go.poll()  # the parent still imports: a free core
    _send(out, ["done", draw])
    out.send_bytes(header)
    for array in arrays:
        out.send_bytes(memoryview(array).cast("B"))
    out.close()
    del header, arrays
    if draw:
        from cpi_merge.report.plan_files import write_plan_pictures

        write_plan_pictures(plan, pictures)
