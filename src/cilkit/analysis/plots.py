"""Figures comparing runs: accuracy curves, old/new accuracy, confusion, new-class share, annotations.

Every figure has two halves: a ``*_data`` function that pulls the plotted numbers out of
results.json (or the stored scores) and returns them as plain lists, and a ``plot_*`` function
that draws exactly that data. Tests check the first against results.json; the second only draws.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, and no
change to the caller's matplotlib backend) and returned as PNG bytes.
"""

from __future__ import annotations

import io as _bytes_io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cilkit.metrics import Results, variant_names
from cilkit.run.layout import RunLayout
from cilkit.run.readers import read_scores
from cilkit.analysis.significance import mean_std

DPI = 100
PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]



# ----- data ------------------------------------------------------------------------------------
def _curve(classes: list[int], series: list[list[float | None]], base: str) -> dict[str, Any]:
    """One line of :func:`curve_data`: a run's top-1 per state, or for several runs their mean,
    with ``std`` (sample std, ddof=1) and ``runs``; a state some run lacks is None."""
    if len(series) == 1:
        return {"classes": classes, "top1": series[0], "base": base}
    stats = [mean_std(list(v)) if all(x is not None for x in v) else (None, None) for v in zip(*series)]
    return {"classes": classes, "top1": [m for m, _ in stats], "std": [s for _, s in stats], "runs": len(series),
            "base": base}


def curve_data(results: Results, repeats: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Top-1 after each state against the number of classes seen: one line per method, plus a
    dashed line per extra score set (``"icarl [cnn]"``) whose ``base`` is the method's label.
    A label of ``repeats`` (its runs, one per seed) gets the mean over them and their std."""
    data: dict[str, dict[str, Any]] = {}
    for label, r in results.items():
        runs = list((repeats or {}).get(label, [r]))
        classes = [s["classes_seen"] for s in r["states"]]
        data[label] = _curve(classes, [[s["top1"] for s in x["states"]] for x in runs], label)
        for v in variant_names(r):
            data[f"{label} [{v}]"] = _curve(
                classes, [[s.get("variants", {}).get(v, {}).get("top1") for s in x["states"]] for x in runs], label)
    return data


def old_new_data(results: Results) -> dict[str, dict[str, Any]]:
    """Per method and state: top-1 on the old classes (None in state 0) and on the new ones."""
    return {
        label: {
            "classes": [s["classes_seen"] for s in r["states"]],
            "old": [s["top1_old"] for s in r["states"]],
            "new": [s["top1_new"] for s in r["states"]],
        }
        for label, r in results.items()
    }


def new_share_data(results: Results) -> dict[str, dict[str, Any]]:
    """Per method and state: the share (%) of test predictions falling into the newest classes."""
    return {
        label: {
            "classes": [s["classes_seen"] for s in r["states"]],
            "share": [s["new_class_share"] for s in r["states"]],
        }
        for label, r in results.items()
    }


def true_new_share(run_dir: Path, results: Mapping[str, Any]) -> list[float]:
    """Share (%) of the test images that belong to the newest classes, per state: what an
    unbiased classifier's ``new_class_share`` would be (from the stored labels)."""
    shares = []
    for s in results["states"]:
        (labels,) = read_scores(RunLayout(run_dir).scores(s["state"]), "labels")
        n_old = s["classes_seen"] - len(s["new_classes"])
        shares.append(100.0 * float((labels >= n_old).mean()) if labels.size else 0.0)
    return shares


def confusion_data(run_dirs: Mapping[str, Path], results: Results) -> dict[str, dict[str, Any]]:
    """The last state's confusion matrix per method: ``matrix[i][j]`` counts the test images of
    class position i whose ``scores`` argmax is j. ``classes`` are the original class ids in the
    run's order; ``state_ends`` mark where each state's classes begin."""
    data = {}
    for label, r in results.items():
        if not r["states"]:
            continue
        last = r["states"][-1]
        n = last["classes_seen"]
        scores, labels = read_scores(RunLayout(run_dirs[label]).scores(last["state"]), "scores", "labels")
        pred = scores.argmax(axis=1) if scores.size else np.zeros(0, dtype=np.int64)
        counts = np.bincount(labels.astype(np.int64) * n + pred, minlength=n * n).reshape(n, n)
        names = r.get("class_names") or [str(c) for c in r["class_order"]]  # runs before names were kept
        data[label] = {
            "matrix": counts.tolist(),
            "classes": list(r["class_order"][:n]),
            "names": [_short(str(x)) for x in names[:n]],
            "state_ends": [e for e in r["state_ends"] if e <= n],
        }
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


def annotation_data(results: Results) -> dict[str, dict[str, Any]]:
    """Annotations per class, for the runs whose states carry ``annotations_per_class`` (active
    learning). ``counts[i][j]`` is the count of ``classes[j]`` in ``states[i]`` (None if absent)."""
    data = {}
    for label, r in results.items():
        rows = {s["state"]: _annotation_row(_annotations(s, r.get("method")))
                for s in r["states"] if _annotations(s, r.get("method")) is not None}
        if not rows:
            continue
        classes = sorted({c for row in rows.values() for c in row}, key=_class_key)
        data[label] = {
            "states": list(rows),
            "classes": classes,
            "counts": [[row.get(c) for c in classes] for row in rows.values()],
        }
    return data


# ----- drawing ---------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (no timestamp metadata, so the same data gives the same file)."""
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def rgb_array(fig: Figure) -> np.ndarray:
    """The figure drawn on its Agg canvas, as an (H, W, 3) uint8 array (for TensorBoard)."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # one per round of the palette


def _colours(labels: list[str]) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _markers(labels: list[str]) -> dict[str, str]:
    """A marker per label that changes with each round of :data:`PALETTE`, so that the 11th
    run (colour of the 1st) still has a style of its own."""
    return {label: MARKERS[(i // len(PALETTE)) % len(MARKERS)] for i, label in enumerate(labels)}


def _grid(n: int, per_row: int = 3) -> tuple[int, int]:
    cols = min(n, per_row)
    return math.ceil(n / cols), cols


def _state_axis(ax: Any, classes: list[int]) -> None:
    ax.set_xticks(classes)
    ax.set_xlabel("classes seen")
    ax.grid(alpha=0.3)


def _label_state_plot(ax: Any, data: Mapping[str, Mapping[str, Any]], ylabel: str, ymax: float, title: str) -> None:
    """Axes, labels and legend of a one-panel plot of a per-state value of every method."""
    _state_axis(ax, sorted({c for d in data.values() for c in d["classes"]}))
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, ymax)
    ax.set_title(title)
    outside_legend(ax)


def outside_legend(ax: Any) -> None:
    """The legend to the right of the axes, in columns of at most 16 entries: however many
    runs are compared, it never covers a curve."""
    n = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              ncols=max(1, math.ceil(n / 16)))


def plot_curves(data: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Top-1 vs classes seen (``curve_data``); extra score sets dashed in their method's colour;
    a line over several runs is their mean, in a shaded band of ± one std."""
    fig = _figure(8.4, 4.2)
    ax = fig.add_subplot()
    bases = [label for label, d in data.items() if d["base"] == label]
    colours, markers = _colours(bases), _markers(bases)
    for label, d in data.items():
        primary = d["base"] == label
        colour = colours.get(d["base"], "black")
        if "std" in d:
            mean, std = np.array(_nan(d["top1"])), np.array(_nan(d["std"]))
            ax.fill_between(d["classes"], mean - std, mean + std, color=colour, alpha=0.2 if primary else 0.08,
                            linewidth=0)
        shown = f"{label} (mean ± std, {d['runs']} runs)" if "std" in d else label
        ax.plot(d["classes"], _nan(d["top1"]), color=colour, marker=markers.get(d["base"], "o") if primary else None,
                linestyle="-" if primary else "--", linewidth=2 if primary else 1.2, markersize=4, label=shown)
    _label_state_plot(ax, data, "top-1 accuracy (%)", 100, "Top-1 on all classes seen")
    return fig


def plot_old_new(data: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One panel per method: top-1 on old and on new classes per state (``old_new_data``)."""
    rows, cols = _grid(len(data))
    fig = _figure(3.6 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    colours = _colours(list(data))
    for ax, (label, d) in zip(axes, data.items()):
        ax.plot(d["classes"], _nan(d["old"]), color=colours[label], marker="o", markersize=4, label="old classes")
        ax.plot(d["classes"], _nan(d["new"]), color=colours[label], marker="s", markersize=4, linestyle="--",
                alpha=0.7, label="new classes")
        _state_axis(ax, d["classes"])
        ax.set_ylim(-2, 102)  # a curve at 0% or 100% stays visible above/below the axis line
        ax.set_title(label)
    if data:  # one legend for all panels, above them: never over a curve at 0% or 100%
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=2, fontsize="small")
    for ax in axes[: len(data): cols]:
        ax.set_ylabel("top-1 (%)")
    for ax in axes[len(data):]:
        ax.set_visible(False)
    return fig


def plot_confusion(data: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One panel per method: the last state's confusion matrix (``confusion_data``), each row
    normalised to the % of that true class's test images; white lines separate the states."""
    rows, cols = _grid(len(data))
    fig = _figure(3.6 * cols + 0.8, 3.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (label, d) in zip(axes, data.items()):
        m = np.asarray(d["matrix"], dtype=float)
        m = 100.0 * m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
        for end in d["state_ends"][:-1]:
            ax.axhline(end - 0.5, color="white", linewidth=0.8)
            ax.axvline(end - 0.5, color="white", linewidth=0.8)
        n = len(d["classes"])
        ticks = range(n) if n <= 20 else [e - 1 for e in d["state_ends"]]
        names = d.get("names") or [str(c) for c in d["classes"]]
        ax.set_xticks(list(ticks), [names[t] for t in ticks], fontsize="x-small", rotation=90)
        ax.set_yticks(list(ticks), [names[t] for t in ticks], fontsize="x-small")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(label)
    for ax in axes[len(data):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(data)]), fraction=0.04, aspect=30, label="% of the true class")
    return fig


def plot_new_share(data: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any] | None = None) -> Figure:
    """Share of test predictions in the newest classes per state (``new_share_data``); the
    dotted ``reference`` is the share of test images that truly belong to them."""
    fig = _figure(8.4, 4.2)
    ax = fig.add_subplot()
    colours, markers = _colours(list(data)), _markers(list(data))
    for label, d in data.items():
        ax.plot(d["classes"], _nan(d["share"]), color=colours[label], marker=markers[label], markersize=4, label=label)
    if reference is not None:
        ax.plot(reference["classes"], reference["share"], color="black", linestyle=":", linewidth=1.5,
                label="true share of new-class images")
    _label_state_plot(ax, data, "predictions in the new classes (%)", 105, "Bias towards the newest classes")
    return fig


def plot_annotations(data: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One panel per active run (``annotation_data``): images annotated per class, one bar
    colour per state; a class counted in several states gets side-by-side bars."""
    width = max(6.4, min(16.0, 0.25 * max(len(d["classes"]) for d in data.values()) + 2.0))
    fig = _figure(width, 3.2 * len(data))
    axes = fig.subplots(len(data), 1, squeeze=False).ravel()
    for ax, (label, d) in zip(axes, data.items()):
        counts = np.array(_nan_rows(d["counts"]), dtype=float)  # (states, classes)
        present = ~np.isnan(counts)
        per_class = np.maximum(present.sum(axis=0), 1)
        rank = np.cumsum(present, axis=0) - 1  # a state's slot among the bars of its class
        bar_width = 0.8 / per_class
        x = np.arange(len(d["classes"])) - 0.4 + bar_width * (rank + 0.5)
        for i, state in enumerate(d["states"]):
            row = present[i]
            ax.bar(x[i][row], counts[i][row], width=bar_width[row], color=PALETTE[i % len(PALETTE)],
                   label=f"state {state + 1}")
        k = len(d["classes"])
        step = max(1, k // 40)
        ax.set_xticks(list(range(0, k, step)), d["classes"][::step], fontsize="x-small")
        ax.set_xlim(-0.6, k - 0.4)
        ax.set_xlabel("class (as keyed in results.json: a position in the run's class order)")
        ax.set_ylabel("annotated images")
        ax.set_title(f"{label}: annotations per class")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="x-small", ncols=min(len(d["states"]), 5))
    return fig


def plot_accuracy_matrix(matrix: list[list[float | None]]) -> Figure:
    """One run's accuracy matrix so far: row i = after state i, column j = top-1 (%) on state
    j's classes (results.json ``accuracy_matrix``), each cell labelled."""
    n = len(matrix)
    m = np.full((n, n), math.nan)
    for i, row in enumerate(matrix):
        m[i, : len(row)] = _nan(row)
    fig = _figure(1.2 + 0.55 * n, 0.9 + 0.5 * n)
    ax = fig.add_subplot()
    ax.imshow(m, cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    for (i, j), v in np.ndenumerate(m):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize="x-small", color="white" if v < 60 else "black")
    ticks = list(range(n))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks], fontsize="x-small")
    ax.set_yticks(ticks, [str(t + 1) for t in ticks], fontsize="x-small")
    ax.set_xlabel("classes of state")
    ax.set_ylabel("after state")
    return fig


def _nan_rows(rows: list[list[float | None]]) -> list[list[float]]:
    return [_nan(r) for r in rows]


# ----- all figures of a comparison ----------------------------------------------------------
def figures(run_dirs: Mapping[str, Path], results: Results,
            repeats: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[tuple[str, str, bytes]]:
    """``(file name, caption, PNG)`` for every figure of a comparison; the annotation figure
    only when some run is an active-learning run. A label of ``repeats`` (several runs, one per
    seed; ``results`` and ``run_dirs`` give the first) is drawn as their mean ± std in the top-1
    curve and by its first run, so labelled, in the other figures."""
    repeats = repeats or {}
    band = " Shaded: ± one sample std over the seeds of repeated runs." if repeats else ""
    firsts = " Repeated runs are shown by their first run." if repeats else ""
    shown = {k: f"{k} (1st of {len(repeats[k])} runs)" if k in repeats else k for k in results}
    single = {shown[k]: r for k, r in results.items()}
    dirs = {shown[k]: run_dirs[k] for k in results}
    out = [
        ("top1_curve.png", "Top-1 accuracy on all classes seen so far, after each state "
         f"(dashed: other score sets of the same run, e.g. iCaRL's CNN beside NME).{band}",
         png_bytes(plot_curves(curve_data(results, repeats)))),
        ("old_new.png", f"Top-1 on the old and on the new classes after each state.{firsts}",
         png_bytes(plot_old_new(old_new_data(single)))),
        ("confusion_last_state.png", "Confusion matrix after the last state (rows: true class in the "
         f"run's class order; % of that class's test images); lines separate the states.{firsts}",
         png_bytes(plot_confusion(confusion_data(dirs, single)))),
    ]
    first = next(iter(single))
    first_r = single[first]
    reference = {"classes": [s["classes_seen"] for s in first_r["states"]],
                 "share": true_new_share(dirs[first], first_r)}
    out.append(("new_class_share.png", "Share of test predictions that fall into the classes new in "
                f"each state (the bias towards new classes); dotted: the true share of the new classes' test "
                f"images (in the first run's test set).{firsts}",
                png_bytes(plot_new_share(new_share_data(single), reference))))
    active = annotation_data(single)
    if active:
        out.append(("annotations_per_class.png", f"Active learning: images annotated per class in each state.{firsts}",
                    png_bytes(plot_annotations(active))))
    return out
