"""``--executor slurm``: every run of a plan as one SLURM job (a job array) through submitit,
the scheduler interface Meta's research clusters use; the optional extra ``cilkit[slurm]``.

Each job runs :func:`cilkit.runs.jobs.run_job` on a node that sees the same file system (the run
directories, the Python environment, the data, the state-0 cache). It asks for
``--slurm-cpus-per-job`` CPUs (the run's ``threads`` when unset), ``--slurm-gpus-per-job``
GPUs, ``--slurm-mem-gb`` and ``--slurm-time`` minutes. A job that SLURM preempts or that
reaches its time limit is requeued by submitit (:class:`SlurmRun` is checkpointable) and
continues from its last finished state, as ``--resume`` does; a requeue that comes after the
last state finds the run finished and exits at once, saying so. A failed job is one line, as a
local job's: the exception it raised (or the SLURM state it ended in) and its log file
(:func:`failure_line`). submitit's own files (the
pickled job, its stdout/stderr) go to ``<parent>/slurm/``. This process waits for the jobs,
prints their status lines and forwards their warnings from their run directories, and gathers
them into the parent directory as a local run does, so ``cilkit compare`` reads it; interrupted,
it cancels the jobs it submitted (``cilkit run --resume <parent> --executor slurm`` submits the
unfinished ones).

submitit asks ``sacct`` for the jobs' states. On a cluster that keeps no accounting
(``AccountingStorageType=accounting_storage/none``, no slurmdbd) every such call fails, with
``sacct``'s "Slurm accounting storage is disabled" and submitit's "Bypassing sacct error" on the
console again and again; there this process says once that accounting is off and reads the
states from ``squeue`` instead (:func:`squeue_watcher`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cilkit.common import runlog
from cilkit.common.errors import UserError, described
from cilkit.runs.jobs import RunJob, finished, run_job
from cilkit.runs.status import StatusBoard, status_every
from cilkit.rundir.layout import RunLayout
from cilkit.common.runlog import log


@dataclass(frozen=True)
class SlurmOptions:
    """What each SLURM job asks for (``--slurm-*`` options)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    mem_gb: float | None = None
    time_min: int = 24 * 60
    extra: dict[str, Any] = field(default_factory=dict)  # more submitit slurm_* parameters


def require() -> Any:
    """The submitit module (the optional extra, imported only here, when a plan runs on SLURM);
    one line when it is missing."""
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: pip install 'cilkit[slurm]' (or pip install submitit)") from None
    return submitit


class SlurmRun:
    """The callable a SLURM job runs: one run of the plan. Checkpointable: on preemption or
    timeout submitit requeues it with the same job, which then continues the run directory; an
    attempt that finds the run finished (a requeue that came after the last state) says so in a
    line and exits at once."""

    def __call__(self, job: RunJob) -> str:
        if finished(job):
            with runlog.tee(RunLayout(job.run_dir).run_log):
                log(finished_line(job))
            return str(job.run_dir)
        resumable = job.resume or RunLayout(job.run_dir).config.is_file()  # a requeued attempt continues
        run_job(dataclasses.replace(job, resume=resumable), progress=False)
        return str(job.run_dir)

    def checkpoint(self, job: RunJob) -> Any:
        """submitit's preemption hook: resubmit the same job (it resumes from its checkpoint)."""
        return require().helpers.DelayedSubmission(SlurmRun(), job)


def finished_line(job: RunJob) -> str:
    """What a requeued attempt of a finished job says (in its run.log and its SLURM output)."""
    return (f"[jobs] {job.label}: {job.run_dir} is finished already (every state done): this requeued SLURM job "
            "has nothing to run")


def submitit_parameters(options: SlurmOptions, jobs: int) -> dict[str, Any]:
    """The executor's parameters: what every job asks for, and at most ``jobs`` at once."""
    params: dict[str, Any] = {
        "name": "cilkit",
        "cpus_per_task": options.cpus_per_job,
        "timeout_min": options.time_min,
        "slurm_array_parallelism": jobs,
    }
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.gpus_per_job:
        params["gpus_per_node"] = options.gpus_per_job
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    params.update({f"slurm_{k}": v for k, v in options.extra.items()})
    return params


@dataclasses.dataclass
class SlurmExecutor:
    """Submit the plan's jobs as one array, wait for them, report each as a local job is."""

    jobs: int
    options: SlurmOptions
    board: StatusBoard
    folder: Path  # submitit's files: <parent>/slurm

    def execute(self, jobs: list[RunJob]) -> list[tuple[RunJob, str]]:
        submitit = require()
        if not jobs:
            return []
        executor = submitit.AutoExecutor(folder=str(self.folder), cluster="slurm")
        try:
            executor.update_parameters(**submitit_parameters(self.options, self.jobs))
        except ValueError as e:  # an unknown --slurm-option
            raise UserError(f"--slurm-option: {e}") from None
        off = accounting_off()
        self.board.watch(jobs)
        try:
            submitted = executor.map_array(SlurmRun(), jobs)
        except Exception as e:  # sbatch refused (no such partition, no scheduler here, ...)
            raise UserError(f"--executor slurm: submitting the jobs failed: {described(e, 300)}") from None
        if off is not None:
            log(f"[jobs] SLURM accounting is off here (sacct: {off}): the jobs' states are read from squeue")
            watcher = squeue_watcher()
            for handle in submitted:
                handle.watcher = watcher  # this job's state checks, instead of submitit's sacct watcher
                watcher.register_job(handle.job_id)
        for job, handle in zip(jobs, submitted):
            self.board.start(job, f"SLURM job {handle.job_id}")
        try:
            return self._wait(list(zip(jobs, submitted)))
        except BaseException:  # interrupted: cancel what was submitted (their finished states stay)
            for _, handle in zip(jobs, submitted):
                if not handle.done():
                    handle.cancel(check=False)
            raise

    def _wait(self, pairs: list[tuple[RunJob, Any]]) -> list[tuple[RunJob, str]]:
        failures: list[tuple[RunJob, str]] = []
        waiting = list(pairs)
        while waiting:
            for job, handle in list(waiting):
                if not handle.done():
                    continue
                waiting.remove((job, handle))
                error = _job_error(handle)
                if error is None:
                    self.board.end(job)
                else:
                    failures.append((job, error))
                    self.board.fail(job, error)
            self.board.tick([j for j, _ in waiting])
            if waiting:
                time.sleep(min(status_every(), 2.0))
        return failures


def accounting_off() -> str | None:
    """Why ``sacct`` cannot tell the jobs' states here (its last line of error, e.g. "Slurm
    accounting storage is disabled"), or None when it answers."""
    try:
        out = subprocess.run(["sacct", "--noheader", "-X", "-o", "JobID", "-j", "1"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return described(e, 200)
    if out.returncode == 0:
        return None
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    return lines[-1].removeprefix("sacct: ") if lines else f"exit status {out.returncode}"


GONE = "NOT_IN_SQUEUE"  # the state of a job squeue no longer lists (ended, then dropped by slurmctld)


def squeue_watcher(delay_s: float = 60.0) -> Any:
    """A submitit job-state watcher that reads ``squeue`` (this user's jobs, every state
    slurmctld still holds, one line per array task) where submitit's reads ``sacct``. A job it
    no longer lists ended a while ago (``MinJobAge``): :data:`GONE`, which submitit counts as
    done; whether it succeeded is then its result file's to say, as with ``sacct``."""
    return _squeue_watcher_class()(delay_s=delay_s)


@functools.cache
def _squeue_watcher_class() -> type:
    base: Any = require().slurm.slurm.SlurmInfoWatcher

    class SqueueWatcher(base):
        def _make_command(self) -> list[str] | None:
            if super()._make_command() is None:  # no job left to check
                return None
            return ["squeue", "--noheader", "--array", "--states=all", f"--user={os.getuid()}", "--format=%i|%T|%N"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            info: dict[str, dict[str, str]] = super().read_info("JobID|State|NodeList\n" + text)
            for job_id in self._registered - self._finished:
                info.setdefault(job_id, {"JobID": job_id, "State": GONE, "NodeList": ""})
            return info

    return SqueueWatcher


def _job_error(handle: Any) -> str | None:
    """None when the job returned; else its :func:`failure_line`."""
    try:
        error = handle.exception()
    except Exception as e:  # the job vanished (cancelled, node lost): submitit cannot tell why
        return described(e, 300)
    if error is None:
        return None
    return failure_line(str(error), type(error).__name__, str(handle.paths.stderr))


_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"(?P<type>[A-Za-z_][\w.]*): (?P<message>.*)")
_SLURM_STATE = re.compile(r"has not produced any output \(state: (?P<state>[^)]*)\)")


def failure_line(error: str, error_type: str, log_path: str) -> str:
    """The cause of a failed SLURM job in one line, as a local job's (:mod:`cilkit.runs.jobs`),
    then its log: ``ValueError: boom (log: .../slurm/12_0_log.err)``. ``error``: submitit's
    text of the failure (``error_type``: its class): the job's traceback, whose exception line
    is the cause (a :class:`UserError`'s message alone, as the run printed it); or, for a job
    that left no result (killed by SLURM: time limit, memory, node), its SLURM state and the
    last line of its error stream."""
    lines = error.splitlines()
    if _TRACEBACK in lines:
        after = lines[len(lines) - lines[::-1].index(_TRACEBACK):]  # the last exception of the chain
        cause = next((line for line in after if line.strip() and not line[0].isspace()), error_type)
        cause = _as_run_printed(cause)
    elif (state := _SLURM_STATE.search(error)) is not None:
        stream = error.split("Error stream produced:", 1)[1] if "Error stream produced:" in error else ""
        last = [line.strip() for line in stream.splitlines() if line.strip().strip("-")]
        cause = f"the job ended without a result (SLURM state {state['state']})" + (f": {last[-1]}" if last else "")
    else:
        cause = next((line.strip() for line in lines if line.strip()), error_type)
    return f"{cause[:300]} (log: {log_path})"


def _as_run_printed(line: str) -> str:
    """A traceback's exception line as the local path reports the exception: a UserError (of
    any subclass) by its message, anything else ``Type: message`` with the type's bare name."""
    m = _EXCEPTION_LINE.fullmatch(line)
    if m is None:
        return line
    if m["type"] in _user_error_names():
        return m["message"]
    return f"{m['type'].rpartition('.')[2]}: {m['message']}"


def _user_error_names() -> set[str]:
    """The names a traceback gives UserError and its subclasses (``cilkit.common.errors.RunDiverged``)."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        todo.extend(cls.__subclasses__())
    return names
