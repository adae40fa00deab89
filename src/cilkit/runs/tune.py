"""``cilkit tune``: choose hyperparameters on the validation hold-out, never on the test set.

Every point of a grid (``--grid KEY=V1,V2,...``, several grids form their Cartesian product)
is a run of the config with those values set; each run evaluates, after every state, its own
scores on ``scenario.val_per_class`` held-out images of every seen class (never trained on,
never in the memory: see :meth:`cilkit.run.loop.Run._validate`). Points are ranked by the mean
incremental validation top-1 (without state 1 when there are several states), averaged over
``runs`` seeds; the test set is never read for the choice (a test shows that permuting the
test labels leaves the ranking unchanged); a point without a score ranks last. A point one of
whose runs diverged (its training went non-finite) has no score: it is marked ``diverged`` in the
ranking (which seed, where) and the other points go on. Writes ``ranking.md`` and
``ranking.json`` and prints the ``--set`` line of the winner.

Every point is checked before any runs, on data read once (per distinct ``data`` settings). The
``--out`` must be new, empty, or a tune of the same config file and grid (its marker,
:data:`TUNE_MARKER`, written first; for a tune made before the marker, its ranking.json) holding
nothing but that tune's files (:func:`check_tune_target`): a run, a directory inside or holding
one, another tune or other files are refused. A point directory already there is reused (read
back, or resumed when interrupted) only when its config.yaml is the point's config; one of
another config is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cilkit.common import io
from cilkit.settings.config import RunConfig, load_config, read_yaml
from cilkit.data.base import Dataset
from cilkit.common.errors import UserError
from cilkit.rundir.layout import RunLayout, enclosing_run, holds_run, is_run_dir
from cilkit.common.runlog import log
from cilkit.settings.keys import config_differences
from cilkit.cil.metrics import mean_incremental
from cilkit.runs.execution import Execution
from cilkit.runs.multirun import claimed_runs, is_diverged, run_claims
from cilkit.run.setup import check_protocol
from cilkit.analysis.significance import mean_std

Point = list[tuple[str, str]]
METRICS = {"top1": "mean incremental validation top-1 (excl. state 1), mean over seeds",
           "balanced_top1": "mean incremental validation balanced top-1 (excl. state 1), mean over seeds"}
METRIC = METRICS["top1"]
TUNE_MARKER = ".cilkit-tune"  # written first into a tune's --out: the config file and grid it tunes
_TUNE_FILES = frozenset({TUNE_MARKER, "ranking.json", "ranking.md"})


def parse_grid(items: list[str] | None, required: bool = True) -> dict[str, list[str]]:
    """``["train.lr=0.1,0.01", "lucir.lambda_base=1,2,5"]`` -> ``{key: [values]}``; values stay
    YAML text for ``--set``; commas inside brackets do not split (``m=[30,60],[40,80]``)."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid '{item}': expected KEY=V1,V2,...")
        if key in grid:
            raise UserError(f"--grid: '{key}' is given twice")
        grid[key] = [v.strip() for v in re.split(r",(?![^\[\]]*\])", values) if v.strip()]
    if not grid and required:
        raise UserError("cilkit tune: give at least one --grid KEY=V1,V2,...")
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[Point]:
    keys = list(grid)
    return [list(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_config(config_path: str | None, overrides: list[str], point: Point,
                 plugins: list[str] | None = None) -> RunConfig:
    """The config of one grid point; it must run one method with a validation hold-out and
    train (``train.epochs`` 0 would rank untrained models: chance-level ties)."""
    config = load_config(config_path, overrides + [f"{k}={v}" for k, v in point], plugins)
    if config.train.epochs < 1 or config.train.epochs_of(0) < 1:
        key = "train.epochs" if config.train.epochs < 1 else "train.epochs_first"
        raise UserError(f"cilkit tune: config key '{key}' must be >= 1: a point that trains nothing ranks a "
                        "model at chance")
    if not isinstance(config.method, str):
        raise UserError("cilkit tune: the config must name one method (tune each method on its own)")
    if config.scenario.val_per_class < 1:
        raise UserError("cilkit tune: config key 'scenario.val_per_class' must be >= 1: the grid is ranked "
                        "on held-out validation images, never on the test set")
    return config


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"--metric '{metric}': expected one of {', '.join(METRICS)}")


def validation_score(results: dict[str, Any], metric: str = "top1") -> float | None:
    """Mean incremental validation top-1 (``metric`` top1) or balanced top-1 (balanced_top1:
    the mean over classes of each class's accuracy, so a minority class counts as much as a
    majority one), without the first state when there are several."""
    if metric == "top1":
        key = "mean_incremental_val_top1_excl_first" if len(results["states"]) > 1 else "mean_incremental_val_top1"
        value = results.get(key)
        return None if value is None else float(value)
    values = [s.get("val_balanced_top1") for s in results["states"]]
    if not values or any(v is None for v in values):
        return None
    return mean_incremental([float(v) for v in values], skip_first=len(values) > 1)


def check_reused(config: RunConfig, run_dir: Path) -> None:
    """Refuse to reuse an existing point directory whose config.yaml is not the point's config
    (every key but those that shape no result, as ``--resume`` allows: ``threads``, ...)."""
    path = RunLayout(run_dir).config
    stored = read_yaml(path)
    try:
        stored = RunConfig.model_validate(stored).to_dict()  # today's defaults for keys it lacks
    except ValidationError:
        pass  # compared as written: the keys it gets wrong differ
    keys = config_differences(config.to_dict(), stored)
    if keys:
        shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
        raise UserError(f"cilkit tune: '{run_dir}' holds a run of another config ({path} differs in {shown}): "
                        "remove it or tune into another --out")


def run_points(configs: list[RunConfig], dirs: list[Path], execution: Execution, parent: Path,
               datasets: Sequence[Dataset | None] | None = None) -> list[list[dict[str, Any]]]:
    """The results of every seed of every point: all their runs are the jobs of one plan
    (``--jobs N`` runs N of them at once). A point directory of the same config is reused: a
    finished run read back, an interrupted one resumed; one of another config is refused
    (:func:`check_reused`)."""
    with contextlib.ExitStack() as stack:
        claims = []
        for config, run_dir in zip(configs, dirs):
            resume = RunLayout(run_dir).config.is_file()
            if resume:
                check_reused(config, run_dir)
            else:
                config = execution.resolve_threads(config)
            claims.append(stack.enter_context(claimed_runs(config, run_dir, resume)))
        dataset = datasets[0] if datasets and len({id(d) for d in datasets}) == 1 else None
        gathered = run_claims(claims, execution, parent, dataset=dataset)
    return [list(results.values()) for results in gathered]


def point_datasets(configs: list[RunConfig]) -> list[Dataset]:
    """Each point's dataset, read once for all points with the same ``data`` settings, and
    every point checked on it as :func:`cilkit.run.loop.check_protocol` checks a run (device,
    scenario, method options, model), before anything runs."""
    loaded: dict[str, Dataset] = {}
    out = []
    for config in configs:
        key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
        loaded[key] = check_protocol(config, loaded.get(key))
        out.append(loaded[key])
    return out


def _slug(point: Point) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", f"{k}={v}") for k, v in point)[:120]


def _ranked(row: dict[str, Any]) -> tuple[bool, float]:
    """Sort key: best score first, unscored points last (ties keep the grid order)."""
    score = row["val_score_mean"]
    return (score is None, 0.0 if score is None else -score)


def point_name(k: int, point: Point) -> str:
    """The directory of the ``k``-th point below the tune's --out: ``00-train.lr=0.1``."""
    return f"{k:02d}-{_slug(point)}"


def tune_identity(config_path: str | None, grid: dict[str, list[str]]) -> dict[str, Any]:
    """What a tune's marker records: its config file (absolute) and its grid. A later tune into
    the same --out must have both the same; its ``--set`` values are checked point by point."""
    return {"config": str(Path(config_path).resolve()) if config_path else "quickstart", "grid": grid}


def _recorded_tune(out: Path) -> dict[str, Any] | None:
    """The identity of the tune ``out`` holds: its marker's, or (a tune made before the marker)
    its ranking.json's config and grid; None when it holds no tune."""
    for name in (TUNE_MARKER, "ranking.json"):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("grid"), dict) and isinstance(data.get("config"), str):
            config = data["config"]
            if name != TUNE_MARKER and config != "quickstart":
                config = str(Path(config).resolve())
            return {"config": config, "grid": data["grid"], **{k: data[k] for k in ("search", "ranges") if k in data}}
    return None


def _grid_text(grid: dict[str, Any]) -> str:
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in grid.items())


def _shown(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names[:3]) + (" ..." if len(names) > 3 else "")


def check_tune_target(out: Path, identity: dict[str, Any], point_dirs: list[str]) -> None:
    """Refuse an --out that a tune of ``identity`` (:func:`tune_identity`) with the points
    ``point_dirs`` may not write into: a file, a directory inside a run or holding one (its
    results.json, or run directories that are not a tune's points), a tune of another config
    or grid, or a directory with anything but this tune's files. New or empty: taken."""
    if out.exists() and not out.is_dir():
        raise UserError(f"cilkit tune: --out '{out}' is a file, not a directory")
    outer = enclosing_run(out)
    if outer is not None:
        raise UserError(f"cilkit tune: --out '{out}' lies inside the cilkit run '{outer}': choose a directory "
                        "outside it")
    if is_run_dir(out) or RunLayout(out).results.is_file():
        raise UserError(f"cilkit tune: --out '{out}' holds a cilkit run: tune into a new or empty directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    recorded = _recorded_tune(out)
    if recorded is None:
        what = "a cilkit run" if holds_run(out) else f"files that are not a cilkit tune ({_shown(entries)})"
        raise UserError(f"cilkit tune: --out '{out}' holds {what}: tune into a new or empty directory")
    if recorded != identity or list(recorded["grid"]) != list(identity["grid"]):
        raise UserError(f"cilkit tune: --out '{out}' holds another tune (config {recorded['config']}, grid "
                        f"{_grid_text(recorded['grid'])}): tune into another --out")
    foreign = [n for n in entries if n not in _TUNE_FILES and n not in point_dirs]
    if foreign:
        raise UserError(f"cilkit tune: --out '{out}' holds files that are not of this tune ({_shown(foreign)}): "
                        "tune into another --out")


def point_row(values: dict[str, Any], config: RunConfig, runs: list[dict[str, Any]], run_dir: Path,
              metric: str) -> dict[str, Any]:
    """A point's line of the ranking: its validation score over its seeds. A point with a run
    that diverged (:func:`~cilkit.runs.multirun.is_diverged`) has no score, whatever its other
    seeds scored: its row says where each diverged (``diverged``)."""
    scores = [None if is_diverged(r) else validation_score(r, metric) for r in runs]
    known = [s for s in scores if s is not None]
    diverged = [_divergence_brief(r["diverged"]) for r in runs if is_diverged(r)]
    mean, std = mean_std(known) if known and not diverged else (None, None)
    row = {"values": values, "val_score_mean": mean, "val_score_std": std,
           "seeds": [config.seed + i for i in range(len(runs))], "val_scores": scores, "dir": str(run_dir)}
    return row | {"diverged": diverged} if diverged else row


def _divergence_brief(record: dict[str, Any]) -> dict[str, Any]:
    """Where a point's run diverged, for its ranking row: seed, state, stage, epoch, loss term."""
    return {k: record.get(k) for k in ("seed", "state", "stage", "epoch", "term", "value")}


def tune(config_path: str | None, grid_items: list[str], overrides: list[str], out: Path,
         execution: Execution | None = None, plugins: list[str] | None = None,
         metric: str = "top1") -> dict[str, Any]:
    """Run every grid point into ``out/<k>-<values>`` (``execution``: where; all points' runs
    are one plan), rank by validation score (``metric``: top1 or balanced_top1), write the
    ranking; returns the ranking record (also ``out/ranking.json``)."""
    execution = execution or Execution()
    execution.check()
    check_metric(metric)
    grid = parse_grid(grid_items)
    points = grid_points(grid)
    configs = [point_config(config_path, overrides, p, plugins) for p in points]  # every point checked first
    identity, names = tune_identity(config_path, grid), [point_name(k, p) for k, p in enumerate(points)]
    check_tune_target(out, identity, names)
    datasets = point_datasets(configs)
    io.write_json(out / TUNE_MARKER, identity)  # first: the directory is this tune's from now on
    log(f"[tune] {len(points)} points: " + "; ".join(" ".join(f"{key}={v}" for key, v in p) for p in points))
    batch = run_points(configs, [out / n for n in names], execution, out, datasets)
    rows = [point_row(dict(point), config, runs, out / name, metric)
            for point, config, runs, name in zip(points, configs, batch, names)]
    return write_ranking(out, rows, {"config": config_path or "quickstart", "overrides": overrides, "grid": grid},
                         metric, "grid point")


def write_ranking(out: Path, rows: list[dict[str, Any]], what: dict[str, Any], metric: str,
                  unit: str) -> dict[str, Any]:
    """Rank ``rows`` (best validation score first, unscored last), say whether the winner is a
    tie (:func:`verdict`), write ranking.json and ranking.md; the record."""
    if all(r["val_score_mean"] is None for r in rows):
        diverged = sum(bool(r.get("diverged")) for r in rows)
        why = (f"its runs under '{out}' recorded no validation top-1" if not diverged else
               f"the training of every {unit} diverged (each run's diverged.json under '{out}' says where)"
               if diverged == len(rows) else
               f"{diverged} diverged, the others' runs under '{out}' recorded no validation top-1")
        raise UserError(f"cilkit tune: no {unit} has a score ({METRICS[metric]}): {why}")
    ranking = sorted(rows, key=_ranked)
    best = ranking[0]
    record = {
        **what,
        "metric": METRICS[metric],
        "ranking": ranking,
        "chosen": best["values"],
        "set_line": " ".join(f"--set {k}={v}" for k, v in best["values"].items()),
        "verdict": verdict(ranking),
        "caveat": caveat(ranking),
    }
    io.write_json(out / "ranking.json", record)
    note = f"\n\n{record['caveat']}" if record["caveat"] else ""
    io.write_text(out / "ranking.md", ranking_table(ranking, METRICS[metric]) + note + "\n")
    return record


def verdict(ranking: list[dict[str, Any]]) -> str:
    """``chosen`` when the best point is ahead of the runner-up by more than their seed noise
    (the larger of their sample stds over seeds; with one seed, any difference), else ``tie``:
    the validation score cannot tell them apart, and the first is only shown first."""
    scored = [r for r in ranking if r["val_score_mean"] is not None]
    if len(scored) < 2:
        return "chosen"
    a, b = scored[0], scored[1]
    noise = max(a["val_score_std"] or 0.0, b["val_score_std"] or 0.0)
    return "tie" if a["val_score_mean"] - b["val_score_mean"] <= noise + 1e-9 else "chosen"


def caveat(ranking: list[dict[str, Any]]) -> str | None:
    """What a ``chosen`` verdict cannot say (grid and ``--search`` alike): with one seed per
    point for the first two, there is no noise to hold their difference against, so any
    difference wins; None when they have a seed noise (or there is no runner-up)."""
    scored = [r for r in ranking if r["val_score_mean"] is not None]
    if len(scored) < 2 or any(r["val_score_std"] is not None for r in scored[:2]):
        return None
    gap = scored[0]["val_score_mean"] - scored[1]["val_score_mean"]
    return (f"single seed, no noise estimate: the first two differ by {gap:.2f} points, which one seed cannot tell "
            "from seed noise; more seeds (--set runs=R) would")


def ranking_table(ranking: list[dict[str, Any]], metric: str = METRICS["top1"]) -> str:
    """The ranking as markdown; ``metric``: the recorded description of the score ranked."""
    keys = list(ranking[0]["values"])
    score_name = "val. balanced top-1" if "balanced" in metric else "val. top-1"
    lines = ["| rank | " + " | ".join(keys) + f" | {score_name} (mean inc., excl. 1st) | runs |",
             "|---|" + "---|" * (len(keys) + 2)]
    for i, r in enumerate(ranking, 1):
        score = ("diverged" if r.get("diverged") else "-") if r["val_score_mean"] is None else f"{r['val_score_mean']:.2f}"
        if r["val_score_std"] is not None:
            score += f" ± {r['val_score_std']:.2f}"
        lines.append(f"| {i} | " + " | ".join(str(r["values"][k]) for k in keys) + f" | {score} | {len(r['val_scores'])} |")
    return "\n".join(lines)
