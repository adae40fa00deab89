"""``cilkit tune``: choose hyperparameters on the validation hold-out, never on the test set.

Every point of a grid (``--grid KEY=V1,V2,...``, several grids form their Cartesian product)
is a run of the config with those values set; each run evaluates, after every state, its own
scores on ``scenario.val_per_class`` held-out images of every seen class (never trained on,
never in the memory: see :meth:`cilkit.runner.Run._validate`). Points are ranked by the mean
incremental validation top-1 (without state 1 when there are several states), averaged over
``runs`` seeds; the test set is never read for the choice (a test shows that permuting the
test labels leaves the ranking unchanged). Writes ``ranking.md`` and ``ranking.json`` and
prints the ``--set`` line of the winner.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np

from cilkit import io
from cilkit.config import RunConfig, load_config
from cilkit.errors import UserError
from cilkit.rundir import RunLayout, read_results
from cilkit.runlog import log
from cilkit.runner import repeat_dirs, run_methods

Point = list[tuple[str, str]]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["train.lr=0.1,0.01", "lucir.lambda_base=1,2,5"]`` -> ``{key: [values]}``; values stay
    YAML text for ``--set``; commas inside brackets do not split (``m=[30,60],[40,80]``)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid '{item}': expected KEY=V1,V2,...")
        if key in grid:
            raise UserError(f"--grid: '{key}' is given twice")
        grid[key] = [v.strip() for v in re.split(r",(?![^\[\]]*\])", values) if v.strip()]
    if not grid:
        raise UserError("cilkit tune: give at least one --grid KEY=V1,V2,...")
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[Point]:
    keys = list(grid)
    return [list(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_config(config_path: str | None, overrides: list[str], point: Point) -> RunConfig:
    """The config of one grid point; it must run one method with a validation hold-out."""
    config = load_config(config_path, overrides + [f"{k}={v}" for k, v in point])
    if not isinstance(config.method, str):
        raise UserError("cilkit tune: the config must name one method (tune each method on its own)")
    if config.scenario.val_per_class < 1:
        raise UserError("cilkit tune: config key 'scenario.val_per_class' must be >= 1: the grid is ranked "
                        "on held-out validation images, never on the test set")
    return config


def validation_score(results: dict[str, Any]) -> float | None:
    """Mean incremental validation top-1, without the first state when there are several."""
    key = "mean_incremental_val_top1_excl_first" if len(results["states"]) > 1 else "mean_incremental_val_top1"
    value = results.get(key)
    return None if value is None else float(value)


def run_point(config: RunConfig, run_dir: Path) -> list[dict[str, Any]]:
    """The results of every seed of one grid point (a finished point is read back, an
    interrupted one resumed)."""
    if not RunLayout(run_dir).config.is_file():
        run_methods(config, run_dir)
    else:
        dirs = [run_dir] if config.runs == 1 else repeat_dirs(config, run_dir)
        if not all(RunLayout(d).results.is_file() and read_results(RunLayout(d).results).get("complete")
                   for d in dirs):
            run_methods(config, run_dir, resume=True)
    dirs = [run_dir] if config.runs == 1 else repeat_dirs(config, run_dir)
    return [read_results(RunLayout(d).results) for d in dirs]


def _slug(point: Point) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", f"{k}={v}") for k, v in point)[:120]


def tune(config_path: str | None, grid_items: list[str], overrides: list[str], out: Path) -> dict[str, Any]:
    """Run every grid point into ``out/<k>-<values>``, rank by validation score, write the
    ranking; returns the ranking record (also ``out/ranking.json``)."""
    grid = parse_grid(grid_items)
    points = grid_points(grid)
    configs = [point_config(config_path, overrides, p) for p in points]  # every point checked first
    rows: list[dict[str, Any]] = []
    for k, (point, config) in enumerate(zip(points, configs)):
        run_dir = out / f"{k:02d}-{_slug(point)}"
        log(f"[tune] point {k + 1}/{len(points)}: {' '.join(f'{key}={v}' for key, v in point)}")
        runs = run_point(config, run_dir)
        scores = [validation_score(r) for r in runs]
        known = np.array([s for s in scores if s is not None], dtype=np.float64)
        rows.append({
            "values": dict(point),
            "val_score_mean": float(known.mean()) if known.size else None,
            "val_score_std": float(known.std(ddof=1)) if known.size > 1 else None,
            "seeds": [config.seed + i for i in range(len(runs))],
            "val_scores": scores,
            "dir": str(run_dir),
        })
    ranking = sorted(rows, key=lambda r: -np.inf if r["val_score_mean"] is None else -r["val_score_mean"])
    best = ranking[0]
    record = {
        "config": config_path or "quickstart",
        "overrides": overrides,
        "grid": grid,
        "metric": "mean incremental validation top-1 (excl. state 1), mean over seeds",
        "ranking": ranking,
        "chosen": best["values"],
        "set_line": " ".join(f"--set {k}={v}" for k, v in best["values"].items()),
    }
    io.write_json(out / "ranking.json", record)
    io.write_text(out / "ranking.md", ranking_table(ranking) + "\n")
    return record


def ranking_table(ranking: list[dict[str, Any]]) -> str:
    keys = list(ranking[0]["values"])
    lines = ["| rank | " + " | ".join(keys) + " | val. top-1 (mean inc., excl. 1st) | runs |",
             "|---|" + "---|" * (len(keys) + 2)]
    for i, r in enumerate(ranking, 1):
        score = "-" if r["val_score_mean"] is None else f"{r['val_score_mean']:.2f}"
        if r["val_score_std"] is not None:
            score += f" ± {r['val_score_std']:.2f}"
        lines.append(f"| {i} | " + " | ".join(str(r["values"][k]) for k in keys) + f" | {score} | {len(r['val_scores'])} |")
    return "\n".join(lines)
