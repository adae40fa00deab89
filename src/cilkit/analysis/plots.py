"""Figures comparing runs: accuracy curves (top-1 and balanced top-1), old/new accuracy,
confusion, new-class share, annotations.

The numbers come from :mod:`cilkit.analysis.figure_data`; this module only draws them, in one
style (:data:`STYLE`, applied by :func:`styled` to every figure), with matplotlib's object API on
an Agg canvas (no pyplot, no display, no change to the caller's matplotlib backend). Each figure
is returned as PNG (for report.html, TensorBoard, wandb) and PDF (vector, for a paper) bytes, both
free of timestamps so that the same data gives the same files. Accuracy axes are fitted to the
data (``y_range="fit"``) or span 0-100 (``"full"``); a line equal to an earlier one is drawn
hollow and dotted on top of it and named in the caption.
"""

from __future__ import annotations

import functools
import io as _bytes_io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cilkit.cil.metrics import Results
from cilkit.analysis.figure_data import (  # re-exported: tests and callers import them from here
    Repeats,
    Y_RANGES,
    annotation_data,
    as_floats as _nan,
    band_edges,
    confusion_data,
    curve_data,
    identical_lines,
    identical_note,
    new_share_data,
    old_new_data,
    row_percent,
    shot_data,
    seeds_note,
    true_new_share,
    y_limits,
)

__all__ = ["FigureFile", "STYLE", "Y_RANGES", "annotation_data", "confusion_data", "curve_data", "figures",
           "identical_lines", "new_share_data", "old_new_data", "png_bytes", "pdf_bytes", "plot_accuracy_matrix",
           "plot_annotations", "plot_confusion", "plot_curves", "plot_new_share", "plot_old_new", "rgb_array",
           "row_percent", "shot_data", "true_new_share", "y_limits"]

# ----- the one style of every figure ------------------------------------------------------------
STYLE: dict[str, Any] = {
    "dpi": 100,
    "curve_size": (8.4, 4.2),        # one-panel per-state plots (inches): room for the legend beside
    "panel_size": (3.6, 3.0),        # one panel of a per-method grid
    "panels_per_row": 3,
    "palette": ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"],
    "markers": ["o", "s", "^", "D", "v", "P", "X"],  # one per round of the palette
    "line_width": 2.0, "variant_line_width": 1.2, "marker_size": 4.0,
    "band_alpha": 0.2, "variant_band_alpha": 0.08,
    "identical": {"linestyle": ":", "marker": "o", "markersize": 9.0, "markerfacecolor": "none",
                  "markeredgewidth": 1.4},     # a line equal to an earlier one: hollow rings on top of it
    "legend": {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0},  # right of the axes
    "legend_rows": 16,
    "min_span": 5.0,                 # a fitted accuracy axis is at least this many points tall
    "rc": {                          # over matplotlib's defaults (not the user's matplotlibrc)
        "font.size": 9.0, "axes.titlesize": 10.0, "axes.labelsize": 9.0, "legend.fontsize": "small",
        "xtick.labelsize": 8.0, "ytick.labelsize": 8.0, "lines.linewidth": 2.0, "lines.markersize": 4.0,
        "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "image.cmap": "viridis",
        "pdf.fonttype": 42,          # TrueType in the PDF: text stays text in a paper's editor
    },
}
F = TypeVar("F", bound=Callable[..., Any])


def styled(function: F) -> F:
    """Run ``function`` under :data:`STYLE`'s rc settings on top of matplotlib's defaults: the
    same look whatever the user's matplotlibrc says."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.style.context(["default", STYLE["rc"]]):
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=STYLE["dpi"], layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@styled
def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (no timestamp metadata, so the same data gives the same file)."""
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=STYLE["dpi"], metadata={"Software": None})
    return buf.getvalue()


@styled
def pdf_bytes(fig: Figure) -> bytes:
    """The figure as a vector PDF without creation date or producer: the same data gives the
    same bytes."""
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="pdf", metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                             "Creator": None})
    return buf.getvalue()


def rgb_array(fig: Figure) -> np.ndarray:
    """The figure drawn on its Agg canvas, as an (H, W, 3) uint8 array (for TensorBoard)."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _colours(labels: Sequence[str]) -> dict[str, str]:
    palette = STYLE["palette"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _markers(labels: Sequence[str]) -> dict[str, str]:
    """A marker per label that changes with each round of the palette, so that the 11th run
    (colour of the 1st) still has a style of its own."""
    n, markers = len(STYLE["palette"]), STYLE["markers"]
    return {label: markers[(i // n) % len(markers)] for i, label in enumerate(labels)}


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, STYLE["panels_per_row"])
    return math.ceil(n / cols), cols


def _state_axis(ax: Any, classes: Sequence[int]) -> None:
    ax.set_xticks(list(classes))
    ax.set_xlabel("classes seen")


def outside_legend(ax: Any) -> None:
    """The legend to the right of the axes, in columns of at most ``legend_rows`` entries:
    however many runs are compared, it never covers a curve."""
    n = len(ax.get_legend_handles_labels()[1])
    ax.legend(ncols=max(1, math.ceil(n / STYLE["legend_rows"])), **STYLE["legend"])


def _band(ax: Any, classes: Sequence[int], mean: Sequence[float | None], std: Sequence[float | None] | None,
          colour: str, alpha: float) -> None:
    if std is not None:
        m, s = _nan(mean), _nan(std)
        ax.fill_between(classes, m - s, m + s, color=colour, alpha=alpha, linewidth=0)


def _runs_label(label: str, d: Mapping[str, Any], spread: bool = True) -> str:
    """A label as legend or title: with the number of runs its line is the mean of."""
    if "runs" not in d:
        return label
    return f"{label} (mean ± std, {d['runs']} runs)" if spread else f"{label} (mean of {d['runs']} runs)"


def _line_style(primary: bool, marker: str | None) -> dict[str, Any]:
    return {"marker": marker if primary else None, "linestyle": "-" if primary else "--", "clip_on": False,
            "linewidth": STYLE["line_width"] if primary else STYLE["variant_line_width"],
            "markersize": STYLE["marker_size"]}


@styled
def plot_curves(data: Mapping[str, Mapping[str, Any]], y_range: str = "fit", key: str = "top1",
                title: str = "Top-1 on all classes seen", ylabel: str = "top-1 accuracy (%)") -> Figure:
    """``key`` vs classes seen (``curve_data``); extra score sets dashed in their method's colour;
    a line over several runs is their mean, in a shaded band of ± one std; a line equal to an
    earlier one is drawn as hollow rings on top of it (else it would hide under it)."""
    fig = _figure(*STYLE["curve_size"])
    ax = fig.add_subplot()
    bases = [label for label, d in data.items() if d["base"] == label]
    colours, markers = _colours(bases), _markers(bases)
    hidden = {later: earlier for earlier, later in identical_lines(data, key)}
    shown: list[float | None] = []
    for label, d in data.items():
        primary, colour = d["base"] == label, colours.get(d["base"], "black")
        _band(ax, d["classes"], d[key], d.get("std"), colour,
              STYLE["band_alpha"] if primary else STYLE["variant_band_alpha"])
        style, name = _line_style(primary, markers.get(d["base"], "o")), _runs_label(label, d)
        if label in hidden:
            style.update(STYLE["identical"])
            name += f" (= {hidden[label]})"
        ax.plot(d["classes"], _nan(d[key]), color=colour, label=name, **style)
        shown += band_edges(d[key], d.get("std"))
    _state_axis(ax, sorted({c for d in data.values() for c in d["classes"]}))
    ax.set_ylim(*y_limits(shown, y_range, min_span=STYLE["min_span"]))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    outside_legend(ax)
    return fig


OLD_NEW = (("old", "o", "-", 1.0, "old classes"), ("new", "s", "--", 0.7, "new classes"))
SHOTS = (("many", "o", "-", 1.0, "many-shot classes"), ("medium", "s", "--", 0.85, "medium-shot classes"),
         ("few", "^", ":", 0.7, "few-shot classes"))  # shot_data's lines


@styled
def plot_old_new(data: Mapping[str, Mapping[str, Any]], y_range: str = "fit",
                 parts: Sequence[tuple[str, str, str, float, str]] = OLD_NEW) -> Figure:
    """One panel per method: top-1 on old and on new classes per state (``old_new_data``; or
    the ``parts`` named, e.g. :data:`SHOTS` of ``shot_data``), over several runs their means with
    ± one std bands; one fitted y-axis for all panels."""
    rows, cols = _grid(len(data))
    width, height = STYLE["panel_size"]
    fig = _figure(width * cols, height * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    colours = _colours(list(data))
    shown: list[float | None] = []
    for ax, (label, d) in zip(axes, data.items()):
        for part, marker, linestyle, alpha, name in parts:
            std = d.get(f"{part}_std")
            _band(ax, d["classes"], d[part], std, colours[label], STYLE["band_alpha"])
            ax.plot(d["classes"], _nan(d[part]), color=colours[label], marker=marker, linestyle=linestyle, alpha=alpha,
                    linewidth=STYLE["variant_line_width"], markersize=STYLE["marker_size"], clip_on=False,
                    label=name)
            shown += band_edges(d[part], std)
        _state_axis(ax, d["classes"])
        ax.set_title(_runs_label(label, d, spread=False))
    axes[0].set_ylim(*y_limits(shown, y_range, min_span=STYLE["min_span"]))  # shared by every panel
    if data:  # one legend for all panels, above them: never over a curve at 0% or 100%
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(parts))
    for ax in axes[: len(data): cols]:
        ax.set_ylabel("top-1 (%)")
    for ax in axes[len(data):]:
        ax.set_visible(False)
    return fig


@styled
def plot_confusion(data: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One panel per method: the last state's confusion matrix (``confusion_data``), each row
    normalised to the % of that true class's test images (over several runs: the mean of each
    run's row percentages); white lines separate the states."""
    rows, cols = _grid(len(data))
    width, height = STYLE["panel_size"]
    fig = _figure(width * cols + 0.8, (height + 0.8) * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (label, d) in zip(axes, data.items()):
        image = ax.imshow(row_percent(np.asarray(d["matrix"], dtype=float)), vmin=0, vmax=100, interpolation="nearest")
        for end in d["state_ends"][:-1]:
            ax.axhline(end - 0.5, color="white", linewidth=0.8)
            ax.axvline(end - 0.5, color="white", linewidth=0.8)
        n = len(d["classes"])
        ticks = list(range(n)) if n <= 20 else [e - 1 for e in d["state_ends"]]
        names = d.get("names") or [str(c) for c in d["classes"]]
        ax.set_xticks(ticks, [names[t] for t in ticks], fontsize="x-small", rotation=90)
        ax.set_yticks(ticks, [names[t] for t in ticks], fontsize="x-small")
        ax.grid(False)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(_runs_label(label, d, spread=False))
    for ax in axes[len(data):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(data)]), fraction=0.04, aspect=30, label="% of the true class")
    return fig


@styled
def plot_new_share(data: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any] | None = None) -> Figure:
    """Share of test predictions in the newest classes per state (``new_share_data``; over
    several runs the mean ± one std); the dotted ``reference`` is the share of test images that
    truly belong to them. A share, not an accuracy: the axis spans 0-105 whatever ``y_range``."""
    fig = _figure(*STYLE["curve_size"])
    ax = fig.add_subplot()
    colours, markers = _colours(list(data)), _markers(list(data))
    hidden = {later: earlier for earlier, later in identical_lines(data, "share")}
    for label, d in data.items():
        _band(ax, d["classes"], d["share"], d.get("std"), colours[label], STYLE["band_alpha"])
        style, name = _line_style(True, markers[label]), _runs_label(label, d)
        if label in hidden:
            style.update(STYLE["identical"])
            name += f" (= {hidden[label]})"
        ax.plot(d["classes"], _nan(d["share"]), color=colours[label], label=name, **style)
    if reference is not None:
        ax.plot(reference["classes"], reference["share"], color="black", linestyle=":", linewidth=1.5,
                label="true share of new-class images")
    _state_axis(ax, sorted({c for d in data.values() for c in d["classes"]}))
    ax.set_ylim(0, 105)
    ax.set_ylabel("predictions in the new classes (%)")
    ax.set_title("Bias towards the newest classes")
    outside_legend(ax)
    return fig


@styled
def plot_annotations(data: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One panel per active run (``annotation_data``): images annotated per class, one bar
    colour per state (over several runs: the mean); a class counted in several states gets
    side-by-side bars."""
    width = max(6.4, min(16.0, 0.25 * max(len(d["classes"]) for d in data.values()) + 2.0))
    fig = _figure(width, (STYLE["panel_size"][1] + 0.2) * len(data))
    axes = fig.subplots(len(data), 1, squeeze=False).ravel()
    palette = STYLE["palette"]
    for ax, (label, d) in zip(axes, data.items()):
        counts = np.array([_nan(r) for r in d["counts"]], dtype=float).reshape(len(d["states"]), len(d["classes"]))
        present = ~np.isnan(counts)
        per_class = np.maximum(present.sum(axis=0), 1)
        rank = np.cumsum(present, axis=0) - 1  # a state's slot among the bars of its class
        bar_width = 0.8 / per_class
        x = np.arange(len(d["classes"])) - 0.4 + bar_width * (rank + 0.5)
        for i, state in enumerate(d["states"]):
            row = present[i]
            ax.bar(x[i][row], counts[i][row], width=bar_width[row], color=palette[i % len(palette)],
                   label=f"state {state + 1}")
        k = len(d["classes"])
        step = max(1, k // 40)
        ax.set_xticks(list(range(0, k, step)), d["classes"][::step], fontsize="x-small")
        ax.set_xlim(-0.6, k - 0.4)
        ax.set_xlabel("class (as keyed in results.json: a position in the run's class order)")
        ax.set_ylabel("annotated images")
        ax.set_title(f"{_runs_label(label, d, spread=False)}: annotations per class")
        ax.grid(axis="x", visible=False)
        ax.legend(fontsize="x-small", ncols=min(len(d["states"]), 5))
    return fig


@styled
def plot_accuracy_matrix(matrix: list[list[float | None]]) -> Figure:
    """One run's accuracy matrix so far: row i = after state i, column j = top-1 (%) on state
    j's classes (results.json ``accuracy_matrix``), each cell labelled."""
    n = len(matrix)
    m = np.full((n, n), math.nan)
    for i, row in enumerate(matrix):
        m[i, : len(row)] = _nan(row)
    fig = _figure(1.2 + 0.55 * n, 0.9 + 0.5 * n)
    ax = fig.add_subplot()
    ax.imshow(m, vmin=0, vmax=100, interpolation="nearest")
    for (i, j), v in np.ndenumerate(m):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize="x-small", color="white" if v < 60 else "black")
    ticks = list(range(n))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks], fontsize="x-small")
    ax.set_yticks(ticks, [str(t + 1) for t in ticks], fontsize="x-small")
    ax.grid(False)
    ax.set_xlabel("classes of state")
    ax.set_ylabel("after state")
    return fig


# ----- all figures of a comparison ----------------------------------------------------------
class FigureFile(NamedTuple):
    """One figure of a report: written as ``name`` (PNG) and :attr:`pdf_name` (PDF)."""

    name: str        # "top1_curve.png"
    caption: str
    png: bytes
    pdf: bytes
    figure: Figure   # the drawn figure (its axes, limits and lines), for callers that look closer

    @property
    def pdf_name(self) -> str:
        return self.name.removesuffix(".png") + ".pdf"


def _file(stem: str, caption: str, fig: Figure) -> FigureFile:
    return FigureFile(f"{stem}.png", caption, png_bytes(fig), pdf_bytes(fig), fig)


def figures(run_dirs: Mapping[str, Path], results: Results, repeats: Repeats | None = None, y_range: str = "fit",
            repeat_dirs: Mapping[str, Sequence[Path]] | None = None) -> list[FigureFile]:
    """Every figure of a comparison (PNG and PDF, with its caption); the balanced top-1 curve
    when some run recorded it, the annotation figure when some run is an active-learning run.
    A label of ``repeats`` (its runs' results, one per seed; ``results`` and ``run_dirs`` give
    the first) is drawn as the mean over its runs in every figure, its confusion matrix from
    the runs of ``repeat_dirs`` (else its first run's). ``y_range``: "fit" (accuracy axes fitted
    to the data) or "full" (0-100); anything else is a :class:`UserError`."""
    y_limits([], y_range)  # the one check, before anything is drawn
    top1 = curve_data(results, repeats)
    out = [_file("top1_curve", "Top-1 accuracy on all classes seen so far, after each state (dashed: other "
                 "score sets of the same run, e.g. iCaRL's CNN beside NME)." + seeds_note(top1)
                 + identical_note(top1, "top1"), plot_curves(top1, y_range))]
    balanced = curve_data(results, repeats, key="balanced_top1")
    if balanced:
        out.append(_file("balanced_top1_curve", "Balanced top-1 (the mean of the per-class accuracies) on all "
                         "classes seen so far, after each state (dashed: other score sets of the same run)."
                         + seeds_note(balanced) + identical_note(balanced, "balanced_top1"),
                         plot_curves(balanced, y_range, "balanced_top1", "Balanced top-1 on all classes seen",
                                     "balanced top-1 accuracy (%)")))
    old_new = old_new_data(results, repeats)
    out.append(_file("old_new", "Top-1 on the old and on the new classes after each state." + seeds_note(old_new),
                     plot_old_new(old_new, y_range)))
    shots = shot_data(results, repeats)
    if shots:  # long-tailed protocols only
        out.append(_file("shot_groups", "Many-, medium- and few-shot top-1 (test images of the seen classes of each "
                         "group by training images per class) after each state; a group without a seen class has no "
                         "point." + seeds_note(shots), plot_old_new(shots, y_range, SHOTS)))
    confusion = confusion_data(run_dirs, results, repeat_dirs)
    firsts = [k for k in (repeats or {}) if k in confusion and "runs" not in confusion[k]]
    out.append(_file("confusion_last_state", "Confusion matrix after the last state (rows: true class in the run's "
                     "class order; % of that class's test images); lines separate the states."
                     + seeds_note(confusion, "the mean of each seed's row percentages")
                     + (f" First run only: {', '.join(firsts)}." if firsts else ""), plot_confusion(confusion)))
    first = next(iter(results))
    reference = {"classes": [s["classes_seen"] for s in results[first]["states"]],
                 "share": true_new_share(run_dirs[first], results[first])}
    share = new_share_data(results, repeats)
    out.append(_file("new_class_share", "Share of test predictions that fall into the classes new in each state "
                     "(the bias towards new classes); dotted: the true share of the new classes' test images (in "
                     "the first run's test set)." + seeds_note(share) + identical_note(share, "share"),
                     plot_new_share(share, reference)))
    active = annotation_data(results, repeats)
    if active:
        out.append(_file("annotations_per_class", "Active learning: images annotated per class in each state."
                         + seeds_note(active, "the mean"), plot_annotations(active)))
    return out
