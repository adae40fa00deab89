"""Several runs into one parent directory: every method of a config on the same protocol
(``<out>/<method>/``) and ``runs: R`` seeds of each (``run_<k>/``, then ``summary.json``). The
directory is claimed (checked, locked) here before anything runs; the runs are the jobs of
:func:`cilkit.runs.jobs.plan`, executed where the :class:`~cilkit.runs.execution.Execution` says.

A run whose training diverged (:class:`~cilkit.common.errors.RunDiverged`: its ``diverged.json``)
does not stop the others: it is reported in one line and gathered as :func:`diverged_results`
(no numbers), which the summary, the tables and ``cilkit tune`` show as diverged. A single run
that diverged, or a plan whose every run did, ends with its one line (exit status 2)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cilkit.common import distributed, io, runlog
from cilkit.common.errors import RunDiverged, UserError, divergence_text
from cilkit.analysis.significance import mean_std
from cilkit.settings.config import RunConfig
from cilkit.settings.overrides import method_label
from cilkit.data.base import Dataset
from cilkit.runs.jobs import JobsFailed, RunJob, finished, plan
from cilkit.runs.execution import Execution
from cilkit.rundir.layout import DirectoryLock, RunLayout, check_target, clear_run, mark_run
from cilkit.rundir.readers import read_divergence, read_results
from cilkit.run.setup import check_protocol
from cilkit.common.runlog import log


def run_methods(
    config: RunConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool | None = None,
    overwrite: bool = False,
    dataset: Dataset | None = None,
    execution: Execution | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every method of ``config`` on the same protocol; one sub-directory per method when
    there are several, ``run_<k>`` per seed with ``runs: R > 1`` (then ``summary.json``).
    Returns ``{method: results}`` (``{"<method>/run_<k>": results}`` with several runs).
    ``execution``: where the runs execute (default: one after another here; see
    :mod:`cilkit.runs.jobs`).

    The directory is claimed first (:func:`claimed_runs`)."""
    out = Path(out_dir)
    execution = execution or Execution()
    execution.check()
    if not resume:
        config = execution.resolve_threads(config)
        distributed.from_main(lambda: check_target(out, overwrite))
        dataset = dataset if dataset is not None else check_protocol(config)
    with claimed_runs(config, out, resume, overwrite) as claim:
        with runlog.tee(RunLayout(out).run_log):  # a comparison's parent logs every method's lines
            # a single run that diverged ends with its own line (refuse_all_diverged), not with two
            results = run_claims([claim], execution, out, progress, dataset, say_diverged=len(claim.jobs) > 1)[0]
            refuse_all_diverged(results)
            return results


def diverged_results(record: dict[str, Any]) -> dict[str, Any]:
    """What a run whose training diverged is gathered as: its ``diverged.json`` record, no numbers."""
    return {"diverged": record}


def is_diverged(results: dict[str, Any]) -> bool:
    """Whether gathered ``results`` are a diverged run's (:func:`diverged_results`)."""
    return "diverged" in results and "states" not in results


def refuse_all_diverged(results: dict[str, dict[str, Any]]) -> None:
    """End a plan whose every run diverged with one line: the run's own (:class:`RunDiverged`),
    or of several, how many and the first."""
    records = [r["diverged"] for r in results.values() if is_diverged(r)]
    if not records or len(records) < len(results):
        return
    if len(records) == 1:
        raise RunDiverged(records[0])
    raise UserError(f"the training of all {len(records)} runs diverged; the first: {records[0]['message']}")


@dataclass(frozen=True)
class Claim:
    """A claimed run directory (locked while the claim lasts) and the jobs of its plan."""

    config: RunConfig
    out: Path
    jobs: list[RunJob]


@contextlib.contextmanager
def claimed_runs(config: RunConfig, out: Path, resume: bool = False, overwrite: bool = False) -> Iterator[Claim]:
    """Claim ``out`` for the runs of ``config`` (threads resolved already) and plan them: a
    fresh run refuses a directory that holds another run (unless ``overwrite``, which clears
    that run's files) or files cilkit did not write, marks it as a run's first, and holds an
    exclusive lock on it while the claim lasts (a second run into it fails at once)."""
    io.make_dir(out)
    with DirectoryLock(out):
        if not resume:
            distributed.from_main(lambda: check_target(out, overwrite))  # again, now that no other run can write here
            if overwrite:
                clear_run(out)
            mark_run(out, config.to_dict())  # first: the directory is a run's from now on
        jobs = plan(config, out, resume)
        if not resume and (not isinstance(config.method, str) or config.runs > 1):
            io.write_yaml(RunLayout(out).config, config.to_dict())
        yield Claim(config, out, jobs)


def run_claims(claims: list[Claim], execution: Execution, parent: Path, progress: bool | None = None,
               dataset: Dataset | None = None, say_diverged: bool = True) -> list[dict[str, dict[str, Any]]]:
    """Execute the unfinished jobs of every claim at once (``parent``: where a scheduler keeps
    its files), then gather each claim's results (and summary.json with ``runs: R > 1``).
    ``dataset``: the claims' data when read already (the in-process runs share it). A run that
    diverged is gathered as :func:`diverged_results`, said in one line (``say_diverged``); any
    other failure raises :class:`JobsFailed` once every job has ended."""
    jobs = [dataclasses.replace(job, label=f"{claim.out.name}: {job.label}") if len(claims) > 1 else job
            for claim in claims for job in claim.jobs]  # several claims (a tune's points): labels that tell them apart
    todo = [j for j in jobs if not (j.resume and finished(j))]  # a resumed parent: the unfinished runs
    if len(todo) < len(jobs):
        log(f"[jobs] {len(jobs) - len(todo)} of {len(jobs)} runs finished already; running the other {len(todo)}")
    if todo:
        failures = execution.build(claims[0].config, dataset, progress, parent).execute(todo)
        diverged = distributed.from_main(lambda: [job for job, _ in failures if RunLayout(job.run_dir).diverged.is_file()])
        if len(diverged) < len(failures):  # other failures: each job's line (a diverged one's included)
            raise JobsFailed(failures)
        if say_diverged:
            for job in diverged:
                log(diverged_line(job.label, distributed.from_main(
                    lambda: read_divergence(RunLayout(job.run_dir).diverged)), job.run_dir))
    out = []
    for claim in claims:
        results = {job.label: gathered_results(job.run_dir) for job in claim.jobs}
        if claim.config.runs > 1:
            write_summary(claim.config, claim.out, results)
        out.append(results)
    return out


def diverged_line(label: str, record: dict[str, Any], run_dir: Path) -> str:
    """``[jobs] wa (seed 1993): training diverged in state 2, train epoch 1: ...; no results, the
    other runs go on (runs/x/wa/diverged.json)``."""
    seed = f" (seed {record['seed']})" if record.get("seed") is not None else ""
    return (f"[jobs] {label}{seed}: training diverged in {divergence_text(record)}; no results, the other runs go "
            f"on ({RunLayout(run_dir).diverged})")


def gathered_results(run_dir: Path) -> dict[str, Any]:
    """A finished run's results.json, or what a run whose training diverged is gathered as
    (:func:`diverged_results`)."""
    layout = RunLayout(run_dir)
    if distributed.from_main(layout.diverged.is_file):
        return diverged_results(distributed.from_main(lambda: read_divergence(layout.diverged)))
    return read_results(layout.results)


def repeat_dirs(config: RunConfig, out_dir: str | os.PathLike) -> list[Path]:
    """The run directories of ``runs: R``: ``<out>/run_<k>`` for one method, else
    ``<out>/<method>/run_<k>``."""
    return [job.run_dir for job in plan(config, Path(out_dir))]


SUMMARY_KEYS = ("mean_incremental_top1", "mean_incremental_top1_excl_first",
                "mean_incremental_balanced_top1", "mean_incremental_balanced_top1_excl_first",
                "mean_incremental_val_top1", "mean_incremental_val_top1_excl_first")


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean, population std (``std``) and sample std (``sample_std``, ddof=1, as the report's
    tables give it; None for one run) of the known values."""
    known = [v for v in values if v is not None]
    mean, sample_std = mean_std(known) if known else (None, None)
    return {"mean": mean, "std": float(np.std(known)) if known else None, "sample_std": sample_std,
            "values": values}


def write_summary(config: RunConfig, out: Path, results: dict[str, dict[str, Any]]) -> None:
    """``<out>/summary.json`` of ``runs: R`` seeds ``seed, seed+1, ...``: per method, mean and
    std (population std, numpy's default, as the active-IL code reports it; ``sample_std``:
    ddof=1, as the report's tables) over the runs of the mean incremental top-1 and balanced
    top-1, with and without state 0."""
    summary: dict[str, Any] = {"runs": config.runs, "seeds": [config.seed + k for k in range(config.runs)], "methods": {}}
    for name in config.method_names:
        runs = [results[f"{name}/run_{k}"] for k in range(config.runs)]
        done = [r for r in runs if not is_diverged(r)]  # a diverged run has no numbers: not in the mean
        summary["methods"][name] = {key: _mean_std([r.get(key) for r in done]) for key in SUMMARY_KEYS}
        diverged = [config.seed + k for k, r in enumerate(runs) if is_diverged(r)]
        if diverged:
            summary["methods"][name]["diverged_seeds"] = diverged
            log(f"[{method_label(name, config.for_method(name).to_dict())}] {len(diverged)} of {config.runs} runs "
                f"diverged (seeds {', '.join(map(str, diverged))}): the summary is over the other {len(done)}")
        m = summary["methods"][name]["mean_incremental_top1_excl_first"]
        if m["sample_std"] is not None:
            log(f"[{method_label(name, config.for_method(name).to_dict())}] {config.runs} runs: mean incremental top-1 (excl. state 1) {m['mean']:.2f} ± "
                f"{m['sample_std']:.2f} (sample std)")
    io.write_json(RunLayout(out).summary, summary)
