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

The journal is checked before Optuna opens it, under the tune's lock (``.cilkit.lock`` in its
--out: one tune at a time writes it): a cut-off last record, what a tune killed while appending
leaves, is dropped with a warning (the file as it was kept as ``study.journal.damaged``) and
the study continues; any other line that is not a journal record is one line naming the file
(:func:`repair_journal`). Each trial's directory, read back from the journal, must lie inside
the --out (:func:`cilkit.common.io.path_inside`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from cilkit.common.errors import UserError
from cilkit.runs.execution import Execution
from cilkit.rundir.layout import LOCK_NAME, DirectoryLock, RunLayout
from cilkit.runs.multirun import gathered_results
from cilkit.runs.tune import (check_metric, check_tune_target, point_config, point_datasets, point_row, run_points,
                             tune_identity, write_ranking, TUNE_MARKER)
from cilkit.common import io
from cilkit.common.runlog import log

SAMPLERS = ("random", "tpe")
JOURNAL = "study.journal"
JOURNAL_LOCK = JOURNAL + ".lock"  # Optuna's link beside the journal while it appends (a kill leaves it)
_DAMAGED = re.compile(re.escape(JOURNAL) + r"\.damaged(-\d+)?")  # journals as they were before a repair


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
    check_tune_target(out, identity, trial_dirs + _journal_files(out))  # before the study file is made
    with DirectoryLock(out, busy=f"cilkit tune: another process is tuning into '{out}' (locked: {out / LOCK_NAME}): "
                                 "wait until it ends, or tune into another --out"):
        study = _study(optuna, out, sampler, base.seed)
        io.write_json(out / TUNE_MARKER, identity)
        for t in study.get_trials(deepcopy=False):  # every path the journal gives, checked before anything runs
            trial_dir(out, t)
        _sample(optuna, study, space, trials, (config_path, overrides, plugins), out, execution, metric)
        rows = [point_row({k: _text(v) for k, v in t.params.items()}, base, _trial_results(trial_dir(out, t), base),
                          trial_dir(out, t), metric) | {"trial": t.number}
                for t in _ranked_trials(optuna, study, out, base)]
    return write_ranking(out, rows, {"config": config_path or "quickstart", "overrides": overrides, "grid": grid,
                                     "ranges": identity["ranges"], "search": sampler, "trials": trials},
                         metric, "trial")


def _sample(optuna: Any, study: Any, space: dict[str, Any], trials: int,
            source: tuple[str | None, list[str], list[str] | None], out: Path, execution: Execution,
            metric: str) -> None:
    """Ask, run and tell batches of trials until ``trials`` are done (``source``: the config
    file, overrides and plugins each trial's config is made from)."""
    config_path, overrides, plugins = source
    while True:
        batch = _next_batch(optuna, study, space, trials, execution.jobs)
        if not batch:
            return
        points = [[(k, _text(v)) for k, v in t.params.items()] for t in batch]
        configs = [point_config(config_path, overrides, p, plugins) for p in points]
        dirs = [trial_dir(out, t) for t in batch]
        for t, p in zip(batch, points):
            log(f"[tune] trial {t.number}: {' '.join(f'{k}={v}' for k, v in p)}")
        runs = run_points(configs, dirs, execution, out, point_datasets(configs))
        for t, p, config, r, d in zip(batch, points, configs, runs, dirs):
            row = point_row(dict(p), config, r, d, metric)
            if row["val_score_mean"] is None:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(t.number, row["val_score_mean"])


def trial_dir(out: Path, trial: Any) -> Path:
    """A trial's run directory, as the journal records it (``dir``), checked to lie inside the
    tune's --out: a journal edited to point elsewhere (``../x``, an absolute path) is refused.
    A trial asked for but killed before its ``dir`` was recorded gets the name it would have had."""
    stored = trial.user_attrs.get("dir", f"trial-{trial.number:03d}")
    return io.path_inside(out, stored, out / JOURNAL, f"trial {trial.number}'s directory")


def _journal_files(out: Path) -> list[str]:
    """The study's files a tune's --out may hold beside its trials: the journal, Optuna's and
    cilkit's locks (a killed tune leaves them) and the journals kept by a repair."""
    kept = sorted(e.name for e in out.iterdir() if _DAMAGED.fullmatch(e.name)) if out.is_dir() else []
    return [JOURNAL, JOURNAL_LOCK, LOCK_NAME, *kept]


def repair_journal(path: Path) -> None:
    """Check Optuna's journal file before Optuna opens it (the tune's lock held: nobody appends
    meanwhile). Optuna itself skips a last line without its end of line and then appends after
    it, gluing the next record onto it (a journal it can no longer read), and raises a
    JSONDecodeError (a UnicodeDecodeError for a binary file) on a bad line before the last.
    Here a cut-off last record (printable JSON text begun but not ended: what a kill during an
    append leaves) is dropped with a one-line warning, the file as it was kept as
    ``study.journal.damaged``, the repaired one renamed into place; any other line that is not a
    journal record (garbage, an empty line, binary data) is a UserError naming the file and
    the line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    for n, line in enumerate(lines, start=1):
        if not _is_record(line):
            _refuse_journal(path, n)
    if end == len(data):
        return
    if not _is_cut_off_record(data[end:]):
        _refuse_journal(path, len(lines) + 1)
    kept = _free_name(path.with_name(path.name + ".damaged"))
    io.write_bytes(kept, data)  # first: the file as it was is never lost
    io.write_bytes(path, data[:end])
    log(f"warning: '{path}' ended in a cut-off record (a tune killed while writing it): dropped it, the study "
        f"continues (the file as it was: '{kept.name}')")


def _is_record(line: bytes) -> bool:
    """A line of Optuna's journal: a JSON object with an ``op_code``."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and "op_code" in record


def _is_cut_off_record(tail: bytes) -> bool:
    """The start of a record: Optuna writes each as one line of ASCII JSON (``ensure_ascii``)."""
    return tail.startswith(b"{") and all(0x20 <= b < 0x7F for b in tail)


def _refuse_journal(path: Path, line: int) -> None:
    raise UserError(f"'{path}' line {line} is not an Optuna journal record (a damaged file, or not the study's "
                    "journal): restore the file, or tune into a new --out")


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3`` ... whichever does not exist yet."""
    k = 1
    while (candidate := path if k == 1 else path.with_name(f"{path.name}-{k}")).exists():
        k += 1
    return candidate


def _remove_stale_optuna_lock(out: Path) -> None:
    """Optuna's lock link beside the journal, left by a tune killed while appending (the tune's
    own lock is held: no live tune holds it); Optuna would otherwise wait 30 s before taking it."""
    link = out / JOURNAL_LOCK
    if link.is_symlink():
        log(f"warning: removing '{link}', left by a tune that was stopped while writing its journal")
        os.unlink(link)


def _study(optuna: Any, out: Path, sampler: str, seed: int) -> Any:
    io.make_dir(out)
    _remove_stale_optuna_lock(out)
    repair_journal(out / JOURNAL)
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
        t.set_user_attr("dir", f"trial-{t.number:03d}")  # read back by trial_dir
        batch.append(study.get_trials(deepcopy=False)[t.number])
    return batch


def _text(value: Any) -> str:
    """A sampled value as ``--set`` text (floats to 6 significant digits: a readable set line)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _trial_runs(run_dir: Path, base: Any) -> list[Path]:
    return [run_dir] if base.runs == 1 else [run_dir / f"run_{k}" for k in range(base.runs)]


def _trial_results(run_dir: Path, base: Any) -> list[dict[str, Any]]:
    """The results of a finished trial's seeds, read back (a seed that diverged: its record,
    :func:`~cilkit.runs.multirun.gathered_results`)."""
    return [gathered_results(d) for d in _trial_runs(run_dir, base)]


def _ranked_trials(optuna: Any, study: Any, out: Path, base: Any) -> list[Any]:
    """The trials the ranking lists: the complete ones, and the failed ones whose training
    diverged (listed as such, without a score)."""
    states = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL))
            if t.state == states.COMPLETE
            or any(RunLayout(d).diverged.is_file() for d in _trial_runs(trial_dir(out, t), base))]
