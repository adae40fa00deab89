"""The numbers the report's figures draw, pulled out of results.json and the stored scores.

Each ``*_data`` function returns plain lists per label (a method, or a group of runs of one
method over several seeds). A label of ``repeats`` (its runs' results, one per seed) gets the
mean over those runs and their sample std (ddof=1) beside it, ``runs`` their number: every figure
shows a group by its mean over the seeds, not by its first run. Tests check these against
results.json; :mod:`cilkit.analysis.plots` only draws them.
"""

from __future__ import annotations

import math

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cilkit.common.errors import UserError
from cilkit.cil.metrics import Results, variant_names
from cilkit.cil.shots import SHOT_GROUPS, SHOT_KEYS, has_shot_figures
from cilkit.rundir.layout import RunLayout
from cilkit.rundir.readers import read_scores
from cilkit.analysis.significance import mean_std

Repeats = Mapping[str, Sequence[Mapping[str, Any]]]
Y_RANGES = ("fit", "full")


def as_floats(values: Sequence[float | None]) -> np.ndarray:
    """Values as a float array, None as NaN (a gap in a drawn line)."""
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def _runs(label: str, r: Mapping[str, Any], repeats: Repeats | None) -> list[Mapping[str, Any]]:
    return list((repeats or {}).get(label, [r]))


def spread(series: Sequence[Sequence[float | None]]) -> tuple[list[float | None], list[float | None] | None]:
    """The mean per position of several runs' series and their sample std (``None`` for one
    run); a position some run lacks is None."""
    if len(series) == 1:
        return list(series[0]), None
    stats = [mean_std([x for x in v if x is not None]) if all(x is not None for x in v) else (None, None)
             for v in zip(*series)]
    return [m for m, _ in stats], [s for _, s in stats]


def _line(classes: list[int], series: list[list[float | None]], key: str, **extra: Any) -> dict[str, Any]:
    """One plotted line: ``key`` (the values or their mean), with ``std`` and ``runs`` over several runs."""
    mean, std = spread(series)
    line: dict[str, Any] = {"classes": classes, key: mean, **extra}
    if std is not None:
        line.update(std=std, runs=len(series))
    return line


def curve_data(results: Results, repeats: Repeats | None = None, key: str = "top1") -> dict[str, dict[str, Any]]:
    """``key`` (top1 or balanced_top1) after each state against the number of classes seen: a
    line per method, plus a dashed line per extra score set (``"icarl [cnn]"``) whose ``base``
    is the method's label. A label of ``repeats`` gets the mean over its runs and their std.
    Lines with no value at all (runs that never recorded ``key``) are left out."""
    data: dict[str, dict[str, Any]] = {}
    for label, r in results.items():
        runs = _runs(label, r, repeats)
        classes = [s["classes_seen"] for s in r["states"]]
        lines = {label: [[s.get(key) for s in x["states"]] for x in runs]}
        for v in variant_names(r):
            lines[f"{label} [{v}]"] = [[s.get("variants", {}).get(v, {}).get(key) for s in x["states"]] for x in runs]
        for name, series in lines.items():
            if any(v is not None for s in series for v in s):
                data[name] = _line(classes, series, key, base=label)
    return data


def _parts(label: str, r: Mapping[str, Any], repeats: Repeats | None, parts: Mapping[str, str]) -> dict[str, Any]:
    """A method's lines of a per-method panel: for each part (name -> state key) its value per
    state (None where a state has none), over several runs the mean with ``<part>_std`` and ``runs``."""
    runs = _runs(label, r, repeats)
    d: dict[str, Any] = {"classes": [s["classes_seen"] for s in r["states"]]}
    for part, key in parts.items():
        mean, std = spread([[s.get(key) for s in x["states"]] for x in runs])
        d[part] = mean
        if std is not None:
            d[f"{part}_std"], d["runs"] = std, len(runs)
    return d


def old_new_data(results: Results, repeats: Repeats | None = None) -> dict[str, dict[str, Any]]:
    """Per method and state: top-1 on the old classes (None in state 0) and on the new ones;
    over several runs their means with ``old_std``/``new_std`` and ``runs``."""
    return {label: _parts(label, r, repeats, {"old": "top1_old", "new": "top1_new"}) for label, r in results.items()}


def shot_data(results: Results, repeats: Repeats | None = None) -> dict[str, dict[str, Any]]:
    """Per long-tailed method and state: many-, medium- and few-shot top-1 (``many``, ``medium``,
    ``few``; :mod:`cilkit.cil.shots`; None in a state where the group has no seen class), over
    several runs their means with ``<group>_std`` and ``runs``. A method whose runs have no shot
    figures (a protocol without a long tail) is left out."""
    return {label: _parts(label, r, repeats, dict(zip(SHOT_GROUPS, SHOT_KEYS))) for label, r in results.items()
            if any(has_shot_figures(x) for x in _runs(label, r, repeats))}


def new_share_data(results: Results, repeats: Repeats | None = None) -> dict[str, dict[str, Any]]:
    """Per method and state: the share (%) of test predictions falling into the newest classes
    (over several runs: the mean, ``std`` and ``runs``)."""
    return {label: _line([s["classes_seen"] for s in r["states"]],
                         [[s["new_class_share"] for s in x["states"]] for x in _runs(label, r, repeats)], "share")
            for label, r in results.items()}


def identical_lines(data: Mapping[str, Mapping[str, Any]], key: str) -> list[tuple[str, str]]:
    """``(earlier, later)`` for each line whose classes and values (and std) equal those of an
    earlier line exactly: drawn on top of each other, the earlier would hide without a word."""
    pairs: list[tuple[str, str]] = []
    seen: dict[tuple[Any, ...], str] = {}
    for label, d in data.items():
        sig = (tuple(d["classes"]), tuple(d[key]), tuple(d.get("std") or ()))
        if sig in seen:
            pairs.append((seen[sig], label))
        else:
            seen[sig] = label
    return pairs


def true_new_share(run_dir: Path, results: Mapping[str, Any]) -> list[float]:
    """Share (%) of the test images that belong to the newest classes, per state: what an
    unbiased classifier's ``new_class_share`` would be (from the stored labels)."""
    shares = []
    for s in results["states"]:
        (labels,) = read_scores(RunLayout(run_dir).scores(s["state"]), "labels")
        n_old = s["classes_seen"] - len(s["new_classes"])
        shares.append(100.0 * float((labels >= n_old).mean()) if labels.size else 0.0)
    return shares


def _confusion_counts(run_dir: Path, last: Mapping[str, Any], n: int) -> np.ndarray:
    """``counts[i, j]``: the test images of class position i whose ``scores`` argmax is j."""
    scores, labels = read_scores(RunLayout(run_dir).scores(last["state"]), "scores", "labels")
    pred = scores.argmax(axis=1) if scores.size else np.zeros(0, dtype=np.int64)
    return np.bincount(labels.astype(np.int64) * n + pred, minlength=n * n).reshape(n, n)


def row_percent(counts: np.ndarray) -> np.ndarray:
    """Each row as the % of that true class's images (an empty row stays 0)."""
    m = np.asarray(counts, dtype=float)
    return 100.0 * m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)


def confusion_data(run_dirs: Mapping[str, Path], results: Results,
                   repeat_dirs: Mapping[str, Sequence[Path]] | None = None) -> dict[str, dict[str, Any]]:
    """The last state's confusion matrix per method: ``matrix[i][j]`` counts the test images of
    class position i whose ``scores`` argmax is j; for a label of ``repeat_dirs`` (its runs'
    directories, one per seed, of one protocol: one class order) it is the mean over the runs of
    each run's row percentages, with ``runs``. ``classes`` are the original class ids in the run's
    order; ``state_ends`` mark where each state's classes begin."""
    data = {}
    for label, r in results.items():
        if not r["states"]:
            continue
        last = r["states"][-1]
        n = last["classes_seen"]
        dirs = list((repeat_dirs or {}).get(label, [run_dirs[label]]))
        names = r.get("class_names") or [str(c) for c in r["class_order"]]  # runs before names were kept
        d: dict[str, Any] = {
            "classes": list(r["class_order"][:n]),
            "names": [_short(str(x)) for x in names[:n]],
            "state_ends": [e for e in r["state_ends"] if e <= n],
        }
        if len(dirs) == 1:
            d["matrix"] = _confusion_counts(dirs[0], last, n).tolist()
        else:
            d["matrix"] = np.mean([row_percent(_confusion_counts(x, last, n)) for x in dirs], axis=0).tolist()
            d["runs"] = len(dirs)
        data[label] = d
    return data


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _annotation_row(value: Any) -> dict[str, float]:
    """One state's ``annotations_per_class``: a ``{class: count}`` mapping or a list by class."""
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    return {str(k): v for k, v in items}


def _class_key(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def _annotations(state: Mapping[str, Any], method: Any) -> Any:
    """A state's ``annotations_per_class``: among the method's own results (``states[b][<method>]``),
    or at the state's top level (results of cilkit 0.1.0, results version 1)."""
    own = state.get(str(method))
    return own.get("annotations_per_class") if isinstance(own, Mapping) else state.get("annotations_per_class")


def _annotation_counts(r: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    return {s["state"]: _annotation_row(_annotations(s, r.get("method")))
            for s in r["states"] if _annotations(s, r.get("method")) is not None}


def annotation_data(results: Results, repeats: Repeats | None = None) -> dict[str, dict[str, Any]]:
    """Annotations per class, for the runs whose states carry ``annotations_per_class`` (active
    learning). ``counts[i][j]`` is the count of ``classes[j]`` in ``states[i]`` (None if absent);
    for a label of ``repeats`` the mean over its runs (a class a run did not annotate in a state
    counts 0 there), with ``runs``."""
    data = {}
    for label, r in results.items():
        per_run = [_annotation_counts(x) for x in _runs(label, r, repeats)]
        rows = per_run[0]
        if not rows:
            continue
        classes = sorted({c for run in per_run for row in run.values() for c in row}, key=_class_key)
        d: dict[str, Any] = {"states": list(rows), "classes": classes}
        if len(per_run) == 1:
            d["counts"] = [[row.get(c) for c in classes] for row in rows.values()]
        else:
            d["counts"] = [[float(np.mean([run.get(b, {}).get(c, 0) for run in per_run])) for c in classes]
                           for b in rows]
            d["runs"] = len(per_run)
        data[label] = d
    return data


# ----- axes and captions -----------------------------------------------------------------------
def y_limits(values: Iterable[float | None], y_range: str = "fit", top: float = 100.0,
             min_span: float = 5.0) -> tuple[float, float]:
    """An accuracy axis: 0..``top`` (``"full"``), or the data's min..max with a margin of 5% (at
    least one point), at least ``min_span`` points tall (a flat curve stays visible), within 0..top."""
    if y_range not in Y_RANGES:
        raise UserError(f"--y-range {y_range!r}: choose fit (the axes fitted to the data) or full (0-100)")
    v = np.array([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if y_range == "full" or not v.size:
        return 0.0, top
    lo, hi = float(v.min()), float(v.max())
    pad = max(0.05 * (hi - lo), 1.0)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if lo < 0:
        lo, hi = 0.0, min(top, hi - lo)
    if hi > top:
        lo, hi = max(0.0, lo - (hi - top)), top
    return lo, hi


def band_edges(mean: Sequence[float | None], std: Sequence[float | None] | None) -> list[float | None]:
    """The values an axis must show: the line and, over several runs, both edges of its band."""
    if std is None:
        return list(mean)
    m, s = as_floats(mean), np.nan_to_num(as_floats(std))
    return [*m.tolist(), *(m - s).tolist(), *(m + s).tolist()]


def seeds_note(data: Mapping[str, Mapping[str, Any]], what: str = "mean ± one sample std (shaded)") -> str:
    """The caption's words for the labels drawn as a mean over several runs (``runs``)."""
    counts = {label: d["runs"] for label, d in data.items() if "runs" in d}
    if not counts:
        return ""
    if len(set(counts.values())) == 1:
        return f" Repeated runs: {what} over {next(iter(counts.values()))} seeds."
    return f" Repeated runs: {what} over their seeds ({', '.join(f'{k}: {n}' for k, n in counts.items())})."


def identical_note(data: Mapping[str, Mapping[str, Any]], key: str) -> str:
    """The caption's words for the lines that :func:`identical_lines` finds equal to an earlier one."""
    pairs = identical_lines(data, key)
    if not pairs:
        return ""
    return (" Identical curves: " + "; ".join(f"{later} = {earlier}" for earlier, later in pairs)
            + " (the later drawn as hollow rings on the earlier).")
