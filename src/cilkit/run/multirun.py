"""Several runs into one parent directory: every method of a config on the same protocol
(``<out>/<method>/``) and ``runs: R`` seeds of each (``run_<k>/``, then ``summary.json``). The
directory is claimed (checked, locked) here before anything runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cilkit import distributed, io, runlog
from cilkit.analysis.significance import mean_std
from cilkit.config import RunConfig
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.run.layout import DirectoryLock, RunLayout, check_target, clear_run, mark_run
from cilkit.run.loop import Run
from cilkit.run.setup import check_protocol, with_resolved_threads
from cilkit.runlog import log


def run_methods(
    config: RunConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool | None = None,
    overwrite: bool = False,
    dataset: Dataset | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every method of ``config`` on the same protocol; one sub-directory per method when
    there are several. Returns ``{method: results}``. With ``runs: R > 1`` see
    :func:`repeat_runs`.

    The directory is claimed first: a fresh run refuses one that holds another run (unless
    ``overwrite``, which clears that run's files) or files cilkit did not write, and the run
    holds an exclusive lock on it to the end (a second run into it fails at once)."""
    out = Path(out_dir)
    if not resume:
        config = with_resolved_threads(config)
        distributed.from_main(lambda: check_target(out, overwrite))
        dataset = dataset if dataset is not None else check_protocol(config)
    io.make_dir(out)
    with DirectoryLock(out):
        if not resume:
            distributed.from_main(lambda: check_target(out, overwrite))  # again, now that no other run can write here
            if overwrite:
                clear_run(out)
            mark_run(out, config.to_dict())  # first: the directory is a run's from now on
        with runlog.tee(RunLayout(out).run_log):  # a comparison's parent logs every method's lines
            return _run_claimed(config, out, resume, progress, dataset)


def _run_claimed(
    config: RunConfig, out: Path, resume: bool, progress: bool | None, dataset: Dataset | None
) -> dict[str, dict[str, Any]]:
    if config.runs > 1:
        return repeat_runs(config, out, resume, progress, dataset)
    if isinstance(config.method, str):
        return {config.method: Run(config, out, progress, dataset).execute(resume=resume)}
    if not resume:
        io.write_yaml(RunLayout(out).config, config.to_dict())
    results = {}
    dataset = dataset if dataset is not None else load_dataset(config.data)  # read once, shared by every method
    for name in config.methods:
        sub = config.for_method(name)
        results[name] = Run(sub, out / name, progress, dataset).execute(resume=resume and (out / name).exists())
    return results


def repeat_dirs(config: RunConfig, out_dir: str | os.PathLike) -> list[Path]:
    """The run directories of ``runs: R``: ``<out>/run_<k>`` for one method, else
    ``<out>/<method>/run_<k>``."""
    out = Path(out_dir)
    bases = [out] if isinstance(config.method, str) else [out / m for m in config.methods]
    return [base / f"run_{k}" for base in bases for k in range(config.runs)]


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


def repeat_runs(
    config: RunConfig, out: Path, resume: bool = False, progress: bool | None = None, dataset: Dataset | None = None
) -> dict[str, dict[str, Any]]:
    """Each method ``runs`` times with seeds ``seed, seed+1, ...`` (into :func:`repeat_dirs`),
    then ``<out>/summary.json``: per method, mean and std (population std, numpy's default, as
    the active-IL code reports it; ``sample_std``: ddof=1, as the report's tables) over the runs
    of the mean incremental top-1 and balanced top-1, with and without state 0. Returns ``{"<method>/run_<k>": results}``."""
    io.make_dir(out)
    if not resume:
        io.write_yaml(RunLayout(out).config, config.to_dict())
    dataset = dataset if dataset is not None else load_dataset(config.data)
    dirs = iter(repeat_dirs(config, out))
    results: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"runs": config.runs, "seeds": [config.seed + k for k in range(config.runs)], "methods": {}}
    for name in config.methods:
        runs = []
        for k in range(config.runs):
            data = config.for_method(name).to_dict() | {"seed": config.seed + k, "runs": 1}
            d = next(dirs)
            r = Run(RunConfig.model_validate(data), d, progress, dataset).execute(resume=resume and d.exists())
            results[f"{name}/run_{k}"] = r
            runs.append(r)
        summary["methods"][name] = {key: _mean_std([r.get(key) for r in runs]) for key in SUMMARY_KEYS}
        m = summary["methods"][name]["mean_incremental_top1_excl_first"]
        if m["sample_std"] is not None:
            log(f"[{name}] {config.runs} runs: mean incremental top-1 (excl. state 1) {m['mean']:.2f} ± "
                f"{m['sample_std']:.2f} (sample std)")
    io.write_json(RunLayout(out).summary, summary)
    return results
