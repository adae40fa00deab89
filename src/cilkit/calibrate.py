"""``cilkit calibrate``: rectify the stored test logits of finished runs, without their model.

Reads ``scores/state_XX.npz`` and ``stats/state_XX.json`` of each run (see
:mod:`cilkit.rundir`), applies a rectifier of :mod:`cilkit.rectify` state by state and writes a
results.json built with :mod:`cilkit.metrics`, as the runner builds its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cilkit import io
from cilkit.errors import UserError
from cilkit.metrics import fmt, run_summary, score_metrics, state_accuracies
from cilkit.rectify import check_rectifier, rectify
from cilkit.report import find_runs
from cilkit.rundir import RunLayout, read_scores, read_stats


def calibrated_results(
    run_dir: Path, source: dict[str, Any], rectifier: str
) -> tuple[dict[str, Any], dict[int, dict[str, np.ndarray]]]:
    """The results.json of ``source`` (a run's results) with every state's test logits
    rectified, and the arrays to store per state. Reads, writes nothing."""
    check_rectifier(rectifier)
    layout = RunLayout(run_dir)
    ends = source["state_ends"]
    out = {k: v for k, v in source.items() if k not in ("states", "accuracy_matrix")}
    out.update(method=f"{source.get('method', '?')}+{rectifier}",
               primary_scores="cnn" if rectifier == "none" else rectifier,
               calibration={"rectifier": rectifier, "source": str(run_dir), "source_method": source.get("method")},
               states=[], accuracy_matrix=[])
    arrays: dict[int, dict[str, np.ndarray]] = {}
    for entry in source["states"]:
        b = int(entry["state"])
        logits_np, labels_np = read_scores(layout.scores(b), "logits", "labels")
        logits, labels = torch.from_numpy(logits_np), torch.from_numpy(labels_np).long()
        stats = read_stats(layout.stats(b), b) if rectifier != "none" else None
        n_old = ends[b - 1] if b > 0 else 0
        scores = rectify(rectifier, logits, stats)
        metrics = score_metrics(scores, labels, n_old, ends[: b + 1])
        out["accuracy_matrix"].append(metrics.pop("accuracy_per_state"))
        variants = {} if rectifier == "none" else {"cnn": state_accuracies(logits, labels, n_old)}
        kept = {k: v for k, v in entry.items() if not k.startswith("val_")}  # validation scores are not stored
        out["states"].append({**kept, **metrics, "variants": variants})
        arrays[b] = {"logits": logits_np, "labels": labels_np, "scores": scores.numpy()}
    out.update(run_summary(out["states"], out["accuracy_matrix"]))
    out["complete"] = bool(source.get("complete"))
    return out, arrays


def calibrate_run(run_dir: Path, rectifier: str, out: Path | None = None, echo: bool = True) -> dict[str, Any]:
    """Rectify the stored test logits of a finished run with ``rectifier`` (``il2m``,
    ``scaling`` or ``none``) and write results.json and ``scores/state_XX.npz`` into ``out``
    (default ``RUN_DIR/calibrated/<rectifier>``). A parent of method sub-directories gets one
    output per method (``<out>/<method>`` or ``RUN_DIR/<method>/calibrated/...``). Loads no
    model and no checkpoint; every input is read before anything is written.
    Returns ``{label: results}`` (label ``""`` for a single run)."""
    check_rectifier(rectifier)
    run_dir = Path(run_dir)
    single = RunLayout(run_dir).results.is_file()
    runs = [r for r in find_runs([run_dir]) if "calibration" not in r.results]  # never re-rectify an output
    if not runs:
        raise UserError(f"calibrate: '{run_dir}' holds no uncalibrated run (its results come from cilkit calibrate)")
    done = []
    for run in runs:
        results, arrays = calibrated_results(run.path, run.results, rectifier)
        base = Path(out) if out is not None else RunLayout(run.path).calibrated(rectifier)
        dest = base / run.path.name if (not single and out is not None) else base
        done.append(("" if single else run.label, dest, run.results, results, arrays))
    for _, dest, source, results, arrays in done:
        layout = RunLayout(dest)
        for b, arr in arrays.items():
            io.write_npz(layout.scores(b), **arr)
        io.write_json(layout.results, results)
        if echo:
            print(before_after_line(source, results, dest))
    return {label: results for label, _, _, results, _ in done}


def before_after_line(source: dict[str, Any], results: dict[str, Any], dest: Path) -> str:
    """``finetune -> finetune+il2m: mean incremental top-1 (excl. state 1) 29.46 -> 28.90 (DEST)``"""
    key = "mean_incremental_top1_excl_first"
    return (f"{source.get('method', '?')} -> {results['method']}: mean incremental top-1 (excl. state 1) "
            f"{fmt(source.get(key))} -> {fmt(results.get(key))}  (written to {dest})")
