"""Where the runs of a plan execute: ``--jobs N`` and ``--executor local|slurm`` as one value.

:class:`Execution` resolves each job's thread count (``threads: null`` -> the run's share of
the cores, or the CPUs a cluster job asks for) and builds the executor of
:mod:`cilkit.runs.jobs` (or :mod:`cilkit.runs.slurm`) for a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cilkit.settings.config import RunConfig
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.common.errors import UserError
from cilkit.runs.jobs import Executor, InProcess, LocalProcesses, cpu_threads_per_job, gpus_for_jobs
from cilkit.runs.status import StatusBoard
from cilkit.runs.slurm import SlurmExecutor, SlurmOptions, require  # submitit itself only when a plan runs there
from cilkit.run.setup import build_scenario, free_cores, with_resolved_threads
from cilkit.common.runlog import log

EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class Execution:
    """``jobs``: how many runs at once (``--jobs``); ``executor``: ``local`` (this machine) or
    ``slurm`` (a cluster, through submitit; then ``jobs`` bounds how many run at once)."""

    jobs: int = 1
    executor: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise UserError(f"--jobs {self.jobs}: expected a number of jobs >= 1")
        if self.executor not in EXECUTORS:
            raise UserError(f"--executor '{self.executor}': expected one of {', '.join(EXECUTORS)}")

    @property
    def in_process(self) -> bool:
        """Whether the runs execute one after another in this process (``--jobs 1``, local)."""
        return self.executor == "local" and self.jobs == 1

    def resolve_threads(self, config: RunConfig) -> RunConfig:
        """``threads: null`` resolved as the runs will use it: the cores free here (one run
        at a time), each job's share of them (``--jobs N``), or a cluster job's CPUs."""
        if self.in_process:
            return with_resolved_threads(config)
        if self.executor == "slurm":
            return config.model_copy(update={"threads": config.threads or self.slurm.cpus_per_job})
        threads, warning = cpu_threads_per_job(config, self.jobs, free_cores())
        if warning:
            log(warning)
        return config.model_copy(update={"threads": threads})

    def check(self) -> None:
        """What can fail before anything runs: the scheduler's package."""
        if self.executor == "slurm":
            require()

    def build(self, config: RunConfig, dataset: Dataset | None, progress: bool | None, parent: Path) -> Executor:
        """The executor of a plan of ``config`` into ``parent`` (``dataset``: its data, when
        read already)."""
        if self.in_process:
            return InProcess(dataset, progress, config.data.model_dump(mode="json"))
        board = status_board(config, dataset if dataset is not None else load_dataset(config.data))
        if self.executor == "slurm":
            return SlurmExecutor(self.jobs, self.slurm, board, parent / "slurm")
        return LocalProcesses(self.jobs, board, gpus_for_jobs(config.device, self.jobs, torch.cuda.device_count()))


def status_board(config: RunConfig, dataset: Dataset) -> StatusBoard:
    """The status lines' denominators: the protocol's states and each state's epochs."""
    num_states = build_scenario(config, dataset).num_states
    return StatusBoard(num_states, [config.train.epochs_of(b) for b in range(num_states)])
