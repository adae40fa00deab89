"""What this process prints of jobs that run elsewhere (local processes, cluster jobs): one
status line per running job (its state, epoch and an ETA read off its ``history.jsonl``), a line
when a job starts, ends or fails, and every warning a job prints, forwarded from its ``run.log``
(:class:`WarningRelay`): once, within seconds or at the latest when the job ends, prefixed by the
job's label and seed, to the console and the parent's ``run.log``."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cilkit.common.errors import UserError
from cilkit.common.runlog import log, relay
from cilkit.rundir.layout import RunLayout
from cilkit.rundir.readers import read_results



class RunJob(Protocol):
    """What the status lines read of a job (:class:`cilkit.runs.jobs.RunJob`)."""

    @property
    def label(self) -> str: ...

    @property
    def run_dir(self) -> Path: ...

    @property
    def config(self) -> dict[str, Any]: ...

STATUS_EVERY_S = 30.0  # how often the running jobs' status lines are printed (CILKIT_STATUS_EVERY_S overrides)


# ----- status lines --------------------------------------------------------------------------
@dataclass
class JobProgress:
    """Where a running job is, from its ``history.jsonl``: finished states, the last epoch line."""

    states_done: int = 0
    state: int = 1
    stage: str = "train"
    epoch: int = 0
    epochs: int | None = None


def read_progress(run_dir: Path, epochs_of: list[int]) -> JobProgress:
    """The progress of the run in ``run_dir`` (``epochs_of[b]``: the training epochs of state b)."""
    import json

    p = JobProgress()
    try:
        lines = RunLayout(run_dir).history.read_text(encoding="utf-8").splitlines()
    except OSError:
        return p
    for text in lines:
        try:
            line = json.loads(text)
        except ValueError:
            continue  # a line being written
        if not isinstance(line, dict):
            continue
        if line.get("kind") == "state":
            p.states_done, p.state, p.epoch = int(line["state"]), int(line["state"]) + 1, 0
        elif line.get("kind") == "epoch":
            p.state, p.stage, p.epoch = int(line["state"]), str(line.get("stage")), int(line["epoch"])
    b = p.state - 1
    p.epochs = epochs_of[b] if 0 <= b < len(epochs_of) else None
    return p


def status_line(label: str, p: JobProgress, num_states: int, elapsed: float) -> str:
    """``[jobs] icarl/run_1: state 2/5, epoch 3/8, ETA 1m20s``; the ETA assumes the states take
    equally long (the first state, often larger, makes it pessimistic early on)."""
    where = f"state {min(p.state, num_states)}/{num_states}"
    if p.epoch:
        where += f", {'' if p.stage == 'train' else p.stage + ' '}epoch {p.epoch}" + (
            f"/{p.epochs}" if p.epochs and p.stage == "train" else "")
    fraction = (p.states_done + (min(p.epoch / p.epochs, 1.0) if p.epochs and p.stage == "train" else 0.0)) / num_states
    eta = f", ETA {_duration(elapsed * (1 - fraction) / fraction)}" if fraction > 0 else ""
    return f"[jobs] {label}: {where}{eta}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_every() -> float:
    return float(os.environ.get("CILKIT_STATUS_EVERY_S", STATUS_EVERY_S))


_WARNING = re.compile(r"(?:\[(?P<who>[^\]]*)\] )?warning: (?P<text>.*)")


@dataclass
class WarningRelay:
    """Forwards the warnings of jobs that run elsewhere (processes, cluster jobs) from each
    job's ``run.log``, where the job writes every line it prints: :meth:`watch` notes where the
    file ends before the job starts, each :meth:`forward` logs the warning lines written since
    (complete lines only, but at the job's end) and moves on past them, so each is forwarded
    once. The job's ``run.log`` is left as it is: the forwarded line goes to the console and to
    the other open log files (the parent's ``run.log``), :func:`cilkit.common.runlog.relay`."""

    offsets: dict[Path, int] = field(default_factory=dict)

    def watch(self, job: RunJob) -> None:
        try:
            self.offsets[job.run_dir] = RunLayout(job.run_dir).run_log.stat().st_size
        except OSError:  # no run.log yet: the job writes it from the start
            self.offsets[job.run_dir] = 0

    def forward(self, job: RunJob, final: bool = False) -> None:
        """Log the job's warnings written since the last call; ``final``: the job ended (a last
        line without its newline is read too)."""
        path = RunLayout(job.run_dir).run_log
        start = self.offsets.get(job.run_dir, 0)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < start:  # the file was replaced: all of it is new
                    start = 0
                f.seek(start)
                data = f.read()
        except OSError:
            return
        if not final:
            data = data[: data.rfind(b"\n") + 1]  # a line being written waits for its end
        self.offsets[job.run_dir] = start + len(data)
        for line in data.decode("utf-8", "replace").splitlines():
            text = warning_line(job, line)
            if text is not None:
                relay(text, path)


def warning_line(job: RunJob, line: str) -> str | None:
    """The line a warning of ``job``'s run.log is forwarded as (None for any other line): the
    job's label and seed in front, for the method's own tag (``[icarl] warning: ...`` ->
    ``[icarl/run_1, seed 1994] warning: ...``); another tag stays after them."""
    m = _WARNING.fullmatch(line)
    if m is None:
        return None
    who = m["who"]
    tag = f" [{who}]" if who is not None and who != job.config.get("method") else ""
    return f"[{job.label}, seed {job.config.get('seed')}]{tag} warning: {m['text']}"


@dataclass
class StatusBoard:
    """The status lines of the jobs running elsewhere (processes, cluster jobs), and their
    warnings (:class:`WarningRelay`)."""

    num_states: int
    epochs_of: list[int]
    started: dict[str, float] = field(default_factory=dict)
    last_print: float = field(default_factory=time.monotonic)
    warnings: WarningRelay = field(default_factory=WarningRelay)

    def watch(self, jobs: Sequence[RunJob]) -> None:
        """Before any of ``jobs`` starts: their warnings are those their run.log gets from now on."""
        for job in jobs:
            self.warnings.watch(job)

    def start(self, job: RunJob, where: str) -> None:
        self.started[job.label] = time.monotonic()
        log(f"[jobs] {job.label}: started ({where}) -> {job.run_dir}")

    def end(self, job: RunJob) -> None:
        self.warnings.forward(job, final=True)
        t0 = self.started.pop(job.label, time.monotonic())
        log(f"[jobs] {job.label}: done in {_duration(time.monotonic() - t0)}{_result_text(job.run_dir)}")

    def fail(self, job: RunJob, cause: str) -> None:
        self.warnings.forward(job, final=True)
        self.started.pop(job.label, None)
        log(f"[jobs] {job.label}: FAILED ({job.run_dir}): {cause}")

    def tick(self, jobs: Sequence[RunJob]) -> None:
        """Forward the running jobs' new warnings; print every running job's line, at most once
        per :func:`status_every` seconds."""
        for job in jobs:
            if job.label in self.started:
                self.warnings.forward(job)
        now = time.monotonic()
        if now - self.last_print < status_every():
            return
        self.last_print = now
        for job in jobs:
            if job.label in self.started:
                p = read_progress(job.run_dir, self.epochs_of)
                log(status_line(job.label, p, self.num_states, now - self.started[job.label]))


def _result_text(run_dir: Path) -> str:
    try:
        value = read_results(RunLayout(run_dir).results).get("mean_incremental_top1")
    except UserError:
        return ""
    return "" if value is None else f": mean incremental top-1 {value:.2f}"


# ----- local processes -----------------------------------------------------------------------