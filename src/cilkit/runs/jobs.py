"""The runs of a comparison, tune or seed sweep as independent jobs, and where they execute.

:func:`plan` lists the runs one config asks for (every method, every seed) as :class:`RunJob`\\ s,
each with its own run directory and a config of one method and one seed. An executor runs
them:

- :class:`InProcess` (the default, ``--jobs 1``): one after another in this process, the data
  read once for all;
- :class:`LocalProcesses` (``--jobs N``): at most N at a time, each in a fresh process
  (``spawn``: no state of this process is inherited, so a job computes exactly what the serial
  run computes); on CPU each job gets its share of the cores (``threads``), on a machine with
  several GPUs each job sees one GPU of its own (``CUDA_VISIBLE_DEVICES``);
- :class:`cilkit.runs.slurm.SlurmExecutor` (``--executor slurm``): one SLURM job per run (an
  array) through submitit.

A job's numbers depend only on its config and data, never on where or beside what it ran: a
run under ``--jobs N`` equals the serial run of the same config (same thread count) bit for
bit. Jobs that need the same state-0 model share the state-0 cache safely: one trains it, the
others wait for it (:func:`cilkit.run.state0cache.entry_lock`). A failed job is one line naming
its run directory and cause; the other jobs go on, and :class:`JobsFailed` is raised at the
end. A job whose run directory holds a finished run is not started again, so ``--resume`` of
the parent directory runs the unfinished jobs only.

While jobs run in other processes, this process prints their status lines and forwards their
warnings (:mod:`cilkit.runs.status`); each job writes its own ``run.log`` and
``history.jsonl`` as a serial run does. Every warning a job prints (a line ``warning: ...`` or
``[<method>] warning: ...``) is forwarded from the job's ``run.log`` (:class:`~cilkit.runs.status.WarningRelay`): once,
within seconds or at the latest when the job ends, prefixed by the job's label and seed
(``[icarl/run_1, seed 1994] warning: ...``), to the console and the parent's ``run.log``.

A job's process outlives nothing it should not: Ctrl-C stops every job as it stops a serial run
(each unwinds on its SIGINT, closing its files: nothing is left for multiprocessing's resource
tracker to warn of), and a job whose parent is gone (killed, even by ``kill -9``) stops before its
next state with a line in its ``run.log`` (:class:`ParentWatch`): its finished states are saved,
``--resume`` continues it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Protocol

from cilkit.common import io, omp
from cilkit.settings.config import RunConfig, validate
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.common.errors import RunDiverged, UserError, described
from cilkit.settings.keys import config_differences
from cilkit.rundir.layout import RunLayout
from cilkit.rundir.readers import read_results
from cilkit.runs.status import StatusBoard, status_every
from cilkit.runs.workers import (ParentGone, ParentWatch, interrupts_ignored, stop_jobs, take_interrupts, tell_parent,
                                  thread_lock_for_bars, watched_run)


@dataclass(frozen=True)
class RunJob:
    """One run of a plan: its label (``icarl/run_1``), directory and config (one method, one
    seed, ``runs: 1``), and whether it continues a run already there."""

    label: str
    run_dir: Path
    config: dict[str, Any]
    resume: bool = False


class JobsFailed(Exception):
    """Some jobs failed (each was reported in one line); the others finished."""

    def __init__(self, failures: list[tuple[RunJob, str]]) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} job(s) failed: " + "; ".join(
            f"{job.run_dir}: {cause}" for job, cause in failures))


def plan(config: RunConfig, out: Path, resume: bool = False) -> list[RunJob]:
    """The runs ``config`` asks for: one method -> ``out`` itself; several -> ``out/<method>``;
    ``runs: R > 1`` -> ``.../run_<k>`` with seeds ``seed + k``. With ``resume``, a directory
    that exists is continued."""
    jobs = []
    for name in config.method_names:
        base = out if isinstance(config.method, str) else out / name
        for k in range(config.runs):
            run_dir = base if config.runs == 1 else base / f"run_{k}"
            label = name if config.runs == 1 else f"{name}/run_{k}"
            data = config.for_method(name).to_dict() | {"seed": config.seed + k, "runs": 1}
            jobs.append(RunJob(label, run_dir, data, resume and run_dir.exists()))
    return jobs


def finished(job: RunJob) -> bool:
    """Whether the job's directory holds a run with nothing left to do: every state done, the
    last state's checkpoint there and made with the job's config in every key a resume keeps.
    Anything else goes to the run itself, which resumes it or says why it cannot."""
    layout = RunLayout(job.run_dir)
    try:
        results = read_results(layout.results) if layout.results.is_file() else {}
    except UserError:
        return False
    ckpts = layout.checkpoints()
    if not results.get("complete") or not ckpts or ckpts[-1][0] != results.get("num_states", 0) - 1:
        return False
    try:
        saved = io.load_torch(ckpts[-1][1]).get("config")
    except Exception:  # unreadable: the run reports it
        return False
    return saved is not None and not config_differences(job.config, json.loads(saved))


def run_job(job: RunJob, dataset: Dataset | None = None, progress: bool | None = None,
            watch: ParentWatch | None = None) -> dict[str, Any]:
    """Run (or continue) one job here; its results. The job's plugins are imported first.
    ``watch``: the process that started this one, which the job checks before each state
    (:class:`ParentWatch`)."""
    from cilkit.run.loop import Run  # the state loop imports the methods: only where a job runs

    config = validate(job.config, source=str(RunLayout(job.run_dir).config))
    run_class = Run if watch is None else watched_run(watch)
    return run_class(config, job.run_dir, progress, dataset).execute(resume=job.resume)


class Executor(Protocol):
    """Runs the jobs of a plan; returns the failed ones with their causes."""

    def execute(self, jobs: list[RunJob]) -> list[tuple[RunJob, str]]: ...


@dataclass
class InProcess:
    """One job after another in this process, each distinct ``data`` setting read once (an
    error stops them all, as a single run's would; a job whose training diverged is returned as
    failed, and the others go on, as under ``--jobs N``). ``dataset``: data read already, for the
    jobs whose ``data`` settings it was read with (``data_config``)."""

    dataset: Dataset | None = None
    progress: bool | None = None
    data_config: dict[str, Any] | None = None

    def execute(self, jobs: list[RunJob]) -> list[tuple[RunJob, str]]:
        loaded: dict[str, Dataset] = {}
        if self.dataset is not None and self.data_config is not None:
            loaded[_data_key(self.data_config)] = self.dataset
        failures: list[tuple[RunJob, str]] = []
        for job in jobs:
            key = _data_key(job.config["data"])
            if key not in loaded and len(jobs) > 1:
                loaded[key] = load_dataset(validate(job.config).data)
            try:
                run_job(job, loaded.get(key), self.progress)
            except RunDiverged as e:  # recorded in the job's directory (diverged.json)
                failures.append((job, str(e)))
        return failures


def _data_key(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, sort_keys=True, default=str)


def _job_process(job: RunJob, conn: multiprocessing.connection.Connection, gpu: int | None, parent_pid: int) -> None:
    """A job's process: its console lines go to its run.log alone (the parent prints status
    lines); its cause of failure goes back to the parent, its traceback to its run.log. It
    stops before its next state when the parent is gone (:class:`ParentWatch`), and on the
    first SIGINT (Ctrl-C, or the parent's :func:`stop_jobs`), which it takes from here on: it
    was started with SIGINT blocked and ignored (:func:`interrupts_ignored`)."""
    try:
        take_interrupts()  # a Ctrl-C that came while the process started arrives here
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before CUDA starts: the job sees one GPU, as cuda:0
        sys.stdout = open(os.devnull, "w")
        thread_lock_for_bars()
        run_job(job, progress=False, watch=ParentWatch(parent_pid))
        outcome = ("done", "")
    except ParentGone:  # said in its run.log; nobody is left to tell
        return
    except KeyboardInterrupt:  # stopped as a serial run is by Ctrl-C: its finished states saved
        outcome = ("failed", "interrupted")
    except BaseException as e:  # report every other cause
        outcome = ("failed", str(e) if isinstance(e, UserError) else described(e, 300))
        _append_traceback(job.run_dir)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job is over: an interrupt would only cut its report
    tell_parent(conn, outcome)


def _append_traceback(run_dir: Path) -> None:
    try:
        path = RunLayout(run_dir).run_log
        if path.parent.is_dir():
            with open(path, "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
    except OSError:
        pass


@dataclass
class LocalProcesses:
    """At most ``jobs`` jobs at a time, each in a process of its own (see the module's
    docstring); ``gpus``: the GPU indices to hand out, one per running job (None on CPU)."""

    jobs: int
    board: StatusBoard
    gpus: list[int] | None = None

    def execute(self, jobs: list[RunJob]) -> list[tuple[RunJob, str]]:
        ctx = multiprocessing.get_context("spawn")
        pending = deque(jobs)
        running: dict[Any, tuple[RunJob, Any, Any, int | None]] = {}  # sentinel -> (job, process, conn, gpu)
        free_gpus = list(self.gpus) if self.gpus is not None else None
        failures: list[tuple[RunJob, str]] = []
        self.board.watch(jobs)
        resource_tracker.ensure_running()  # now: as it starts, it unblocks SIGINT (see interrupts_ignored)
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    job = pending.popleft()
                    gpu = free_gpus.pop(0) if free_gpus else None
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_job_process, args=(job, send, gpu, os.getpid()), name=f"cilkit-{job.label}")
                    with omp.shared_by_children(f"one of --jobs {self.jobs} processes sharing the cores"), \
                            interrupts_ignored():
                        proc.start()  # its idle threads sleep
                        running[proc.sentinel] = (job, proc, recv, gpu)  # before an interrupt can arrive
                    send.close()
                    self.board.start(job, f"process {proc.pid}" + (f", GPU {gpu}" if gpu is not None else ""))
                ready = multiprocessing.connection.wait(list(running), timeout=min(status_every(), 5.0))
                for sentinel in ready:
                    job, proc, recv, gpu = running.pop(sentinel)
                    proc.join()
                    outcome = _outcome(recv, proc.exitcode)
                    if gpu is not None and free_gpus is not None:
                        free_gpus.append(gpu)
                    if outcome[0] == "done" and proc.exitcode == 0:
                        self.board.end(job)
                    else:
                        failures.append((job, outcome[1] or _exit_cause(proc.exitcode)))
                        self.board.fail(job, failures[-1][1])
                self.board.tick([j for j, *_ in running.values()])
        except BaseException:  # interrupted: stop the jobs (each keeps its finished states)
            stop_jobs([proc for _, proc, _, _ in running.values()])
            for job, _, recv, _ in running.values():
                recv.close()
                with contextlib.suppress(Exception):  # what it warned of before it stopped
                    self.board.warnings.forward(job, final=True)
            raise
        return failures


def _outcome(recv: Any, exitcode: int | None) -> tuple[str, str]:
    """What the job's process sent before it exited; a process that died without a word
    (killed, out of memory) failed by its exit code."""
    try:
        outcome: tuple[str, str] = recv.recv() if recv.poll() else ("failed", "")
    except EOFError:
        outcome = ("failed", "")
    finally:
        recv.close()
    return outcome if outcome[1] or outcome[0] == "done" else ("failed", _exit_cause(exitcode))


def _exit_cause(code: int | None) -> str:
    if code is not None and code < 0:
        return f"the job's process was killed (signal {-code})"
    return f"the job's process exited with status {code}"


def cpu_threads_per_job(config: RunConfig, jobs: int, cores: int) -> tuple[int, str | None]:
    """Each of ``jobs`` jobs' thread count: ``threads`` as set, else its share of ``cores``;
    with a warning when the jobs' threads together exceed the cores."""
    if config.threads is None:
        return max(1, cores // jobs), None
    if config.threads * jobs > cores:
        return config.threads, (f"warning: {jobs} jobs x threads {config.threads} exceed the {cores} free cores: "
                                "the jobs slow each other down (leave threads unset to share the cores)")
    return config.threads, None


def gpus_for_jobs(device: str, jobs: int, count: int) -> list[int] | None:
    """The GPUs to hand out, one per running job, when the runs train on CUDA (``device``
    cuda, or auto with ``count`` GPUs); None on CPU. More jobs than GPUs, or one named GPU
    (``cuda:1``) for several jobs, is refused."""
    if device == "cpu" or (device == "auto" and count == 0):
        return None
    if count == 0:
        raise UserError(f"config key 'device': '{device}' asked for, but no CUDA device is available")
    if device.startswith("cuda:"):
        raise UserError(f"--jobs {jobs}: config key 'device' names one GPU ({device}); with --jobs each job gets a "
                        "GPU of its own: set device to cuda (or auto)")
    if jobs > count:
        raise UserError(f"--jobs {jobs}: this machine has {count} GPU(s) and each job gets one: use --jobs {count} "
                        "or fewer")
    return list(range(count))
