"""``cilkit calibrate``: rectify the stored test logits of finished runs, without their model.

Reads ``scores/state_XX.npz`` and ``stats/state_XX.json`` of each run (see
:mod:`cilkit.rundir.layout`), applies a rectifier of :mod:`cilkit.cil.rectify` state by state and writes a
results.json built with :mod:`cilkit.cil.metrics`, as the runner builds its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cilkit.common import io
from cilkit.common.errors import UserError
from cilkit.cil.metrics import add_shot_figures, fmt, run_summary, score_metrics, state_accuracies
from cilkit.cil.rectify import check_rectifier, rectify, scail_classifier, scail_scores
from cilkit.rundir.layout import RunLayout
from cilkit.rundir.readers import RESULTS_VERSION, read_state_classifier, read_state_scores, read_stats
from cilkit.analysis.runsets import FoundRun, scan_runs

# run-level keys of the source's results.json that describe the source run itself, not its
# rectified scores: never copied (the summaries are recomputed; the provenance is kept under
# ``calibration.source_provenance``)
_SOURCE_ONLY = ("states", "accuracy_matrix", "average_forgetting", "wall_time_s", "provenance", "calibration")


def calibrated_results(
    run_dir: Path, source: dict[str, Any], rectifier: str
) -> tuple[dict[str, Any], dict[int, dict[str, np.ndarray]]]:
    """The results.json of ``source`` (a run's results, as :func:`~cilkit.rundir.readers.read_results`
    checked them) with every state's test logits rectified, and the arrays to store per state.
    Reads (each scores and statistics file checked against the state: a damaged one is a
    ``UserError`` naming it), writes nothing."""
    check_rectifier(rectifier)
    layout = RunLayout(run_dir)
    ends = source["state_ends"]
    out = {k: v for k, v in source.items() if k not in _SOURCE_ONLY and not k.startswith("mean_incremental_")}
    calibration: dict[str, Any] = {"rectifier": rectifier, "source": str(Path(run_dir).resolve()),
                                   "source_method": source.get("method")}
    if source.get("provenance") is not None:
        calibration["source_provenance"] = source["provenance"]
    out.update(version=RESULTS_VERSION, method=f"{source.get('method', '?')}+{rectifier}",
               primary_scores="cnn" if rectifier == "none" else rectifier,
               calibration=calibration, states=[], accuracy_matrix=[])
    arrays: dict[int, dict[str, np.ndarray]] = {}
    heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # ScaIL: each state's classifier, in state order
    for entry in source["states"]:
        b = int(entry["state"])
        logits_np, labels_np = read_state_scores(layout.scores(b), ends[b])  # checked against the state
        logits, labels = torch.from_numpy(logits_np), torch.from_numpy(labels_np).long()
        n_old = ends[b - 1] if b > 0 else 0
        if rectifier == "scail":
            scores = _scail_state(layout.scores(b), ends[: b + 1], len(labels_np), heads, logits)
        else:
            stats = read_stats(layout.stats(b), b, ends) if rectifier != "none" else None
            scores = rectify(rectifier, logits, stats)
        metrics = score_metrics(scores, labels, n_old, ends[: b + 1])
        out["accuracy_matrix"].append(metrics.pop("accuracy_per_state"))
        variants = {} if rectifier == "none" else {"cnn": state_accuracies(logits, labels, n_old)}
        kept = {k: v for k, v in entry.items() if not k.startswith("val_")}  # validation scores are not stored
        out["states"].append({**kept, **metrics, "variants": variants})
        add_shot_figures(out["states"][-1], scores, {"cnn": logits} if variants else {}, labels,
                         source.get("imbalance"))
        arrays[b] = {"logits": logits_np, "labels": labels_np, "scores": scores.numpy()}
    out.update(run_summary(out["states"], out["accuracy_matrix"]))
    out["complete"] = bool(source.get("complete"))
    return out, arrays


def _scail_state(path: Path, ends: list[int], n_images: int, heads: list[tuple[torch.Tensor, torch.Tensor]],
                 logits: torch.Tensor) -> torch.Tensor:
    """ScaIL's scores of the state whose classes end at ``ends`` (the stored logits in state 0),
    from its stored features and classifier and those of the states before (``heads``, to which
    this state's classifier is appended)."""
    features, weight, bias = (torch.from_numpy(a) for a in read_state_classifier(path, ends[-1], n_images))
    heads.append((weight, bias))
    if len(ends) == 1:
        return logits
    scaled = scail_classifier(weight, bias, heads[:-1], ends)
    return scail_scores(features, weight, bias, scaled, ends[-2])


def calibrate_run(run_dir: Path, rectifier: str, out: Path | None = None, echo: bool = True) -> dict[str, Any]:
    """Rectify the stored test logits of a finished run with ``rectifier`` (``il2m``,
    ``scaling``, ``scail`` (from the stored features and classifiers) or ``none``) and write results.json and ``scores/state_XX.npz`` into ``out``
    (default ``RUN_DIR/calibrated/<rectifier>``). A parent of runs (one per method, or per
    method and seed) gets one output per run, at the run's path below the parent
    (``<out>/<method>``, ``<out>/<method>/run_<k>``; default ``<run>/calibrated/<rectifier>``). Loads no
    model and no checkpoint; every input is read before anything is written. A run that is
    itself the output of ``cilkit calibrate`` is skipped (and said so when ``echo``); so is a run
    of the parent whose training diverged (it has no scores to rectify), and a diverged run named
    itself is refused. Returns ``{label: results}`` (label ``""`` for a single run)."""
    check_rectifier(rectifier)
    run_dir = Path(run_dir)
    single = RunLayout(run_dir).results.is_file()
    found, diverged = scan_runs([run_dir])
    if RunLayout(run_dir).diverged.is_file() or (diverged and not found):
        raise UserError(f"calibrate: nothing to rectify: {diverged[0].line()}; rerun it with a setting that trains")
    runs = [r for r in found if "calibration" not in r.results]  # never re-rectify an output
    skipped = [r for r in found if "calibration" in r.results]
    if not runs:
        raise UserError(f"calibrate: '{run_dir}' holds no uncalibrated run (its results come from cilkit calibrate)")
    dests = destinations(run_dir, runs, rectifier, out)
    done = []
    for run, dest in zip(runs, dests):
        results, arrays = calibrated_results(run.path, run.results, rectifier)
        done.append(("" if single else run.label, dest, run.results, results, arrays))
    if echo:
        for run in skipped:
            print(f"{run.path}: skipped, already the output of cilkit calibrate ({run.results.get('method', '?')})")
        for d in diverged:
            print(f"{d.path}: skipped, its training diverged ({d.line()})")
    for _, dest, source, results, arrays in done:
        layout = RunLayout(dest)
        for b, arr in arrays.items():
            io.write_npz(layout.scores(b), **arr)
        io.write_json(layout.results, results)
        if echo:
            print(before_after_line(source, results, dest))
    return {label: results for label, _, _, results, _ in done}


def destinations(run_dir: Path, runs: list[FoundRun], rectifier: str, out: Path | None) -> list[Path]:
    """Where each run's calibration goes: ``<out>/<the run's path below RUN_DIR>`` (``<out>``
    itself for a single run), or by default ``<run>/calibrated/<rectifier>``. Two runs sent to
    one place, or one sent into a source run's own directory, are refused (before anything is
    read or written)."""
    sources = {r.path.resolve(): r.path for r in runs}
    taken: dict[Path, Path] = {}
    dests = []
    for run in runs:
        dest = RunLayout(run.path).calibrated(rectifier) if out is None else Path(out) / run.path.relative_to(run_dir)
        key = dest.resolve()
        if key in sources:
            raise UserError(f"calibrate: the calibration of '{run.path}' would overwrite the run '{sources[key]}' "
                            f"(--out '{out}'): choose another --out")
        if key in taken:
            raise UserError(f"calibrate: the calibrations of '{taken[key]}' and '{run.path}' would both go to "
                            f"'{dest}': choose another --out")
        refuse_foreign_results(dest, run.path, rectifier)
        taken[key] = run.path
        dests.append(dest)
    return dests


def refuse_foreign_results(dest: Path, source: Path, rectifier: str) -> None:
    """A destination may hold only an earlier output of this same calibration (same source run,
    same rectifier), which is replaced; any other results.json there (another run, another
    calibration, a file that cannot be read) is refused, never overwritten."""
    path = RunLayout(dest).results
    if not path.exists():
        return
    try:
        calibration = json.loads(path.read_text()).get("calibration") or {}
        ours = (calibration.get("source") == str(source.resolve())
                and calibration.get("rectifier") == rectifier)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"calibrate: '{dest}' already holds results ({path}) that are not the "
                        f"{rectifier} calibration of '{source}': choose another --out")


def before_after_line(source: dict[str, Any], results: dict[str, Any], dest: Path) -> str:
    """``finetune -> finetune+il2m: mean incremental top-1 (excl. state 1) 29.46 -> 28.90 (DEST)``"""
    key = "mean_incremental_top1_excl_first"
    return (f"{source.get('method', '?')} -> {results['method']}: mean incremental top-1 (excl. state 1) "
            f"{fmt(source.get(key))} -> {fmt(results.get(key))}  (written to {dest})")
