"""A job's process under ``--jobs N``, seen from both sides: how it starts (SIGINT held back
while Python starts), how it stops (on its first SIGINT, or before its next state once its parent
is gone, even by ``kill -9``), and how the parent stops the jobs on Ctrl-C. Nothing is left for
multiprocessing's resource tracker to warn of; see :mod:`cilkit.runs.jobs` for the jobs themselves.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cilkit.common.runlog import log
from cilkit.rundir.layout import outermost_run

if TYPE_CHECKING:
    from cilkit.run.loop import Run

STOP_GRACE_S = 20.0  # how long interrupted jobs get to stop on their own before they are terminated


class ParentGone(BaseException):
    """The process that started a job is gone (killed): the job stopped before its next state.
    A BaseException, as an interrupt is: the run records no failure, its finished states stay."""


@dataclass(frozen=True)
class ParentWatch:
    """The process that started a job's process (``parent_pid``); gone when this process was
    handed to another parent (``os.getppid()`` changes when the parent dies, even by kill -9)."""

    parent_pid: int

    def gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def check(self, run: Run, b: int) -> None:
        """Before state ``b`` (0-based) of ``run``: stop when the parent is gone, with a line in
        the run's log (the run's finished states are saved: a resume continues it)."""
        if not self.gone():
            return
        log(f"[{run.tag}] the process that started this job (pid {self.parent_pid}) is gone: stopping before "
            f"state {b + 1}/{run.scenario.num_states}; the finished states are saved: continue with "
            f"cilkit run --resume {outermost_run(run.layout.root)}")
        raise ParentGone()


def watched_run(watch: ParentWatch) -> type[Run]:
    """:class:`~cilkit.run.loop.Run` checking ``watch`` before each state: the state boundary is
    where a job stops (its last state saved, nothing half-written)."""
    from cilkit.run.loop import Run

    class WatchedRun(Run):
        def run_state(self, b: int) -> None:
            watch.check(self, b)
            super().run_state(b)

    return WatchedRun


def take_interrupts() -> None:
    """SIGINT stops the job from here on (:func:`interrupt_once`); one kept pending while the
    process started is raised now."""
    signal.signal(signal.SIGINT, interrupt_once)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def interrupt_once(signum: int, frame: Any) -> None:
    """A job's SIGINT handler: a KeyboardInterrupt (the job unwinds: its files closed, its
    semaphores released) once; later ones are ignored (the parent forwards the Ctrl-C the
    terminal sent the job already)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def thread_lock_for_bars() -> None:
    """tqdm's lock as a thread lock: by default its first bar (even a disabled one) creates a
    multiprocessing RLock, a named semaphore registered with the parent's resource tracker,
    which warns of it as "leaked" when the job is killed before it exits. A job draws no bars
    and shares no console: a thread lock is all it needs, and it leaves nothing behind."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def tell_parent(conn: multiprocessing.connection.Connection, outcome: tuple[str, str]) -> None:
    try:
        conn.send(outcome)
    except BrokenPipeError:  # the parent is gone (killed while the last state ran): nobody waits for it
        pass
    finally:
        conn.close()


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Start a job's process inside: it starts with SIGINT blocked and ignored (both survive the
    exec), so that a Ctrl-C while it imports raises nothing in the middle of Python's start-up
    (a traceback on the console) but waits, pending (a blocked signal is kept, ignored or not),
    until the job takes SIGINT on its first line (:func:`_job_process`). In this process, a
    Ctrl-C in the block waits likewise and arrives as it ends. Only the main thread may set
    handlers: elsewhere a no-op. multiprocessing's resource tracker must be running already: it
    unblocks SIGINT here as it starts (:meth:`LocalProcesses.execute`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    can_block = hasattr(signal, "pthread_sigmask")
    if can_block:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if can_block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def stop_jobs(procs: list[Any], grace_s: float = STOP_GRACE_S) -> None:
    """Stop the jobs' processes as Ctrl-C stops a serial run: SIGINT to each (again every half
    second, for one still starting, where a system drops an ignored signal), then wait up to
    ``grace_s`` for each to unwind and exit (files closed, semaphores released); one still
    running then is terminated."""
    deadline = time.monotonic() + grace_s
    alive = [p for p in procs if p.is_alive()]
    while alive and time.monotonic() < deadline:
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(proc.pid, signal.SIGINT)
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.5)
        alive = [p for p in alive if p.is_alive()]
    for proc in alive:
        proc.terminate()
    for proc in procs:
        proc.join()
