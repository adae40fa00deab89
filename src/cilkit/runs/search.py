"""``cilkit tune --search random|tpe --trials T``: sample the space instead of walking a grid,
with Optuna (the optional extra ``cilkit[tune]``), still ranking on validation only.

The space: every ``--grid KEY=V1,V2,...`` is a categorical choice; every ``--range
KEY=LOW:HIGH`` (``:log`` for a log scale) a number (an integer when both bounds are). The
study lives in the tune's --out as Optuna's journal file (``study.journal``); each trial is one
point, run into ``trial-<number>`` exactly as a grid point (:func:`cilkit.runs.tune.run_points`),
and scored by its validation score (the mean over its seeds).

Trials are asked in batches of ``--jobs`` (Optuna's ask-and-tell): a batch's runs are one plan,
executed as ``--jobs`` / ``--executor`` say, then every trial of the batch is told its score
before the next batch is sampled. So a tune is reproducible for a given ``--jobs`` (the sampler
is seeded by the config's seed), and a larger ``--jobs`` samples from less feedback, as any
parallel TPE does. An interrupted tune continues: ``cilkit tune`` with the same command finds
the trials of the interrupted batch still running in the study, finishes them in their own
directories (a finished run is read back, an interrupted one resumed), tells them, and samples
the rest up to ``--trials``. (A restarted sampler draws its random numbers afresh: the trials
after the interruption are not those an uninterrupted tune would have drawn.)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from cilkit.common.errors import UserError
from cilkit.runs.execution import Execution
from cilkit.rundir.layout import RunLayout
from cilkit.rundir.readers import read_results
from cilkit.runs.tune import (check_metric, check_tune_target, point_config, point_datasets, point_row, run_points,
                             tune_identity, write_ranking, TUNE_MARKER)
from cilkit.common import io
from cilkit.common.runlog import log

SAMPLERS = ("random", "tpe")
JOURNAL = "study.journal"


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("cilkit tune --search needs Optuna: pip install 'cilkit[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def parse_ranges(items: list[str]) -> dict[str, tuple[float, float, bool, bool]]:
    """``["train.lr=0.001:0.1:log", "train.epochs=2:8"]`` -> ``{key: (low, high, log, integer)}``."""
    ranges: dict[str, tuple[float, float, bool, bool]] = {}
    for item in items:
        key, sep, spec = item.partition("=")
        parts = spec.split(":")
        log_scale = len(parts) == 3 and parts[2].strip() == "log"
        if not sep or not key.strip() or len(parts) not in (2, 3) or (len(parts) == 3 and not log_scale):
            raise UserError(f"--range '{item}': expected KEY=LOW:HIGH or KEY=LOW:HIGH:log")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise UserError(f"--range '{item}': LOW and HIGH must be numbers") from None
        if not low < high or (log_scale and low <= 0) or not all(map(math.isfinite, (low, high))):
            raise UserError(f"--range '{item}': expected LOW < HIGH" + (" and LOW > 0 on a log scale" if log_scale else ""))
        integer = all(p.strip().lstrip("-").isdigit() for p in parts[:2])
        ranges[key.strip()] = (low, high, log_scale, integer)
    return ranges


def distributions(optuna: Any, grid: dict[str, list[str]], ranges: dict[str, tuple[float, float, bool, bool]]
                  ) -> dict[str, Any]:
    space: dict[str, Any] = {k: optuna.distributions.CategoricalDistribution(v) for k, v in grid.items()}
    for key, (low, high, log_scale, integer) in ranges.items():
        if key in space:
            raise UserError(f"--range: '{key}' is also a --grid key")
        space[key] = (optuna.distributions.IntDistribution(int(low), int(high), log=log_scale) if integer
                      else optuna.distributions.FloatDistribution(low, high, log=log_scale))
    if not space:
        raise UserError("cilkit tune --search: give at least one --grid KEY=V1,... or --range KEY=LOW:HIGH")
    return space


def search(config_path: str | None, grid: dict[str, list[str]], range_items: list[str], overrides: list[str],
           out: Path, sampler: str, trials: int, execution: Execution | None = None,
           plugins: list[str] | None = None, metric: str = "top1") -> dict[str, Any]:
    """Sample ``trials`` points of the space with ``sampler`` (see the module's docstring);
    the ranking record of the finished trials (also ranking.json / ranking.md)."""
    optuna = require_optuna()
    execution = execution or Execution()
    execution.check()
    check_metric(metric)
    if sampler not in SAMPLERS:
        raise UserError(f"--search '{sampler}': expected one of {', '.join(SAMPLERS)} (or leave it out for the grid)")
    if trials < 1:
        raise UserError(f"--trials {trials}: expected a number of trials >= 1")
    ranges = parse_ranges(range_items)
    space = distributions(optuna, grid, ranges)
    base = point_config(config_path, overrides, [], plugins)  # the config itself checked first
    identity = tune_identity(config_path, grid) | {"search": sampler, "ranges": {k: list(v) for k, v in ranges.items()}}
    trial_dirs = sorted(e.name for e in out.iterdir() if re.fullmatch(r"trial-\d+", e.name)) if out.is_dir() else []
    check_tune_target(out, identity, trial_dirs + [JOURNAL])  # before the study file is made
    study = _study(optuna, out, sampler, base.seed)
    io.write_json(out / TUNE_MARKER, identity)
    while True:
        batch = _next_batch(optuna, study, space, trials, execution.jobs)
        if not batch:
            break
        points = [[(k, _text(v)) for k, v in t.params.items()] for t in batch]
        configs = [point_config(config_path, overrides, p, plugins) for p in points]
        for t, p in zip(batch, points):
            log(f"[tune] trial {t.number}: {' '.join(f'{k}={v}' for k, v in p)}")
        runs = run_points(configs, [out / t.user_attrs["dir"] for t in batch], execution, out, point_datasets(configs))
        for t, p, config, r in zip(batch, points, configs, runs):
            row = point_row(dict(p), config, r, out / t.user_attrs["dir"], metric)
            if row["val_score_mean"] is None:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(t.number, row["val_score_mean"])
    rows = [point_row({k: _text(v) for k, v in t.params.items()}, base, _trial_results(out / t.user_attrs["dir"], base),
                      out / t.user_attrs["dir"], metric) | {"trial": t.number}
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    return write_ranking(out, rows, {"config": config_path or "quickstart", "overrides": overrides, "grid": grid,
                                     "ranges": identity["ranges"], "search": sampler, "trials": trials},
                         metric, "trial")


def _study(optuna: Any, out: Path, sampler: str, seed: int) -> Any:
    io.make_dir(out)
    backend = optuna.storages.journal.JournalFileBackend(str(out / JOURNAL))
    storage = optuna.storages.JournalStorage(backend)
    sampler_obj = (optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    return optuna.create_study(study_name="cilkit-tune", storage=storage, direction="maximize", sampler=sampler_obj,
                               load_if_exists=True)


def _next_batch(optuna: Any, study: Any, space: dict[str, Any], trials: int, jobs: int) -> list[Any]:
    """The trials an interrupted tune left running (finished first), else up to ``jobs`` new
    ones, while fewer than ``trials`` are done."""
    states = optuna.trial.TrialState
    all_trials = study.get_trials(deepcopy=False)
    running = [t for t in all_trials if t.state == states.RUNNING]
    if running:
        log(f"[tune] continuing {len(running)} trial(s) of an interrupted tune")
        return running
    left = trials - sum(t.state in (states.COMPLETE, states.FAIL) for t in all_trials)
    batch = []
    for _ in range(min(jobs, max(left, 0))):
        t = study.ask(space)
        t.set_user_attr("dir", f"trial-{t.number:03d}")
        batch.append(study.get_trials(deepcopy=False)[t.number])
    return batch


def _text(value: Any) -> str:
    """A sampled value as ``--set`` text (floats to 6 significant digits: a readable set line)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _trial_results(run_dir: Path, base: Any) -> list[dict[str, Any]]:
    """The results of a finished trial's seeds, read back."""
    dirs = [run_dir] if base.runs == 1 else [run_dir / f"run_{k}" for k in range(base.runs)]
    return [read_results(RunLayout(d).results) for d in dirs]
