"""The report's figures (issue 26): PDF beside every PNG, accuracy axes fitted to the data,
identical curves named, every figure the mean over the seeds of a repeated run, the balanced
top-1 curve. Expected numbers are computed here from results.json and the stored scores."""

import json
import re
import shutil

import numpy as np
import pytest
from helpers import tiny_config

from cilkit.analysis.plots import confusion_data, curve_data, figures, new_share_data, old_new_data, plot_curves
from cilkit.analysis.report import compare_runs, find_runs
from cilkit.cli import main
from cilkit.common.errors import UserError
from cilkit.runs.multirun import run_methods

FIGURES = ["balanced_top1_curve", "confusion_last_state", "new_class_share", "old_new", "top1_curve"]
METHODS = ("finetune", "icarl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """finetune and iCaRL, 2 seeds each (2 states, 1 epoch), and its report."""
    base = tmp_path_factory.mktemp("figures")
    cfg = tiny_config(base, "train.epochs=1", "threads=1", "runs=2", "scenario.states=2", "method=[finetune,icarl]")
    run_methods(cfg, base / "rep", progress=False)
    compare_runs([base / "rep"], base / "report", echo=False)
    return base


def _seeds(base, method):
    """The results.json of each seed's run, read as a user would."""
    return [json.loads((base / "rep" / method / f"run_{k}" / "results.json").read_text()) for k in range(2)]


def _inputs(base):
    """``figures``' arguments for the 2-seed group, as compare_runs builds them."""
    repeats = {m: _seeds(base, m) for m in METHODS}
    results = {m: rs[0] for m, rs in repeats.items()}
    dirs = {m: base / "rep" / m / "run_0" for m in METHODS}
    repeat_dirs = {m: [base / "rep" / m / f"run_{k}" for k in range(2)] for m in METHODS}
    return dirs, results, repeats, repeat_dirs


def _single(base, tmp_path, name, edit):
    """A copy of finetune's first run named ``name``, its results.json changed by ``edit``."""
    d = tmp_path / name
    shutil.copytree(base / "rep" / "finetune" / "run_0", d, ignore=shutil.ignore_patterns("checkpoints", "report"))
    res = json.loads((d / "results.json").read_text())
    res["method"] = name
    edit(res)
    (d / "results.json").write_text(json.dumps(res))
    return d


def _figs(dirs, **kwargs):
    found = find_runs(dirs)
    return {f.name: f for f in figures({r.label: r.path for r in found}, {r.label: r.results for r in found}, **kwargs)}


@pytest.mark.slow
def test_every_png_has_a_vector_pdf_and_the_same_runs_give_the_same_pdfs(runs, tmp_path, capsys):
    first = runs / "report"
    assert sorted(p.stem for p in first.glob("*.png")) == FIGURES
    assert sorted(p.stem for p in first.glob("*.pdf")) == FIGURES
    compare_runs([runs / "rep"], tmp_path / "again", echo=True)
    assert "5 figures as PNG and PDF" in capsys.readouterr().out
    for name in FIGURES:
        pdf = (first / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and b"/CreationDate" not in pdf, name
        assert pdf == (tmp_path / "again" / f"{name}.pdf").read_bytes(), f"{name}.pdf differs between two compares"
        assert (first / f"{name}.png").read_bytes() == (tmp_path / "again" / f"{name}.png").read_bytes()
    assert "data:application/pdf" not in (first / "report.html").read_text()  # the page keeps the PNGs


def _set(res, top1, balanced, old, new):
    for s, t, b, o, n in zip(res["states"], top1, balanced, old, new):
        s.update(top1=t, balanced_top1=b, top1_old=o, top1_new=n)


@pytest.mark.slow
def test_accuracy_axes_are_fitted_to_the_data_or_span_0_to_100(runs, tmp_path):
    d = _single(runs, tmp_path, "mid", lambda r: _set(r, [88.0, 65.0], [86.0, 66.0], [None, 70.0], [85.0, 67.0]))
    fit = _figs([d])
    for name in ("top1_curve.png", "balanced_top1_curve.png", "old_new.png"):
        lo, hi = fit[name].figure.axes[0].get_ylim()
        low, high = {"top1_curve.png": (65, 88), "balanced_top1_curve.png": (66, 86), "old_new.png": (67, 85)}[name]
        assert low - 4 <= lo < low and high < hi <= high + 4, (name, lo, hi)
    full = _figs([d], y_range="full")
    for name in ("top1_curve.png", "balanced_top1_curve.png", "old_new.png"):
        assert full[name].figure.axes[0].get_ylim() == (0.0, 100.0), name
    flat = find_runs([_single(runs, tmp_path, "flat", lambda r: _set(r, [50.0] * 2, [50.0] * 2, [None, 50.0], [50.0] * 2))])
    lo, hi = plot_curves(curve_data({r.label: r.results for r in flat})).axes[0].get_ylim()
    assert hi - lo >= 3 and lo < 50 < hi  # a flat curve is not squashed onto one line
    # a 2-seed group: the axis holds the mean ± std bands, a few points beyond them
    ft, ic = _seeds(runs, "finetune"), _seeds(runs, "icarl")
    values = []
    for group in (ft, ic):
        top1 = np.array([[s["top1"] for s in r["states"]] for r in group])
        values += [top1.mean(0) - top1.std(0, ddof=1), top1.mean(0) + top1.std(0, ddof=1)]
    cnn = np.array([[s["variants"]["cnn"]["top1"] for s in r["states"]] for r in ic])
    values += [cnn.mean(0) - cnn.std(0, ddof=1), cnn.mean(0) + cnn.std(0, ddof=1)]
    want_lo, want_hi = max(0.0, float(np.min(values))), min(100.0, float(np.max(values)))
    dirs, results, repeats, repeat_dirs = _inputs(runs)
    lo, hi = figures(dirs, results, repeats, repeat_dirs=repeat_dirs)[0].figure.axes[0].get_ylim()
    assert want_lo - 6 <= lo <= want_lo and want_hi <= hi <= want_hi + 6


def test_an_unknown_y_range_is_one_clear_error(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(runs / "rep"), "--out", str(tmp_path / "x"), "--y-range", "bogus"])
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--y-range" in errors[0] and "bogus" in errors[0] and "fit" in errors[0]
    with pytest.raises(UserError, match="--y-range 'bogus'"):
        compare_runs([runs / "rep"], tmp_path / "y", echo=False, y_range="bogus")
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_identical_curves_are_named_in_the_caption_and_drawn_apart(runs, tmp_path):
    twin = _single(runs, tmp_path, "twin", lambda r: None)  # the same numbers as finetune's first run
    out = compare_runs([runs / "rep" / "finetune" / "run_0", twin], tmp_path / "r", echo=False)
    page = (out / "report.html").read_text()
    for name in ("top1_curve", "balanced_top1_curve", "new_class_share"):
        caption = re.search(rf'<figure id="{name}">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)
        assert "Identical curves: twin = finetune" in caption, name
    found = find_runs([runs / "rep" / "finetune" / "run_0", twin])
    ft, tw = plot_curves(curve_data({r.label: r.results for r in found})).axes[0].get_lines()
    assert list(ft.get_ydata()) == list(tw.get_ydata())
    assert (tw.get_marker(), tw.get_markerfacecolor(), tw.get_linestyle()) != (
        ft.get_marker(), ft.get_markerfacecolor(), ft.get_linestyle())  # the hidden one is seen
    assert "Identical" not in re.search(r'<figure id="old_new">.*?</figure>', page, re.S).group(0)
    # a score set equal to the method's own scores
    res = json.loads((runs / "rep" / "icarl" / "run_0" / "results.json").read_text())
    for s in res["states"]:
        s["variants"]["cnn"]["top1"] = s["top1"]
    fig = figures({"icarl": runs / "rep" / "icarl" / "run_0"}, {"icarl": res})[0]
    assert "Identical curves: icarl [cnn] = icarl" in fig.caption
    assert "Identical" not in _figs([runs / "rep" / "icarl" / "run_0"])["top1_curve.png"].caption


def test_every_figure_of_two_seeds_is_their_mean(runs):
    dirs, results, repeats, repeat_dirs = _inputs(runs)
    old_new, share = old_new_data(results, repeats), new_share_data(results, repeats)
    for m in METHODS:
        per = repeats[m]
        for part in ("old", "new"):
            values = np.array([[s[f"top1_{part}"] for s in r["states"]][1 if part == "old" else 0:] for r in per])
            got = old_new[m][part][1:] if part == "old" else old_new[m][part]
            assert got == pytest.approx(values.mean(0).tolist())
            std = old_new[m][f"{part}_std"][1:] if part == "old" else old_new[m][f"{part}_std"]
            assert std == pytest.approx(values.std(0, ddof=1).tolist())
        assert old_new[m]["old"][0] is None and old_new[m]["runs"] == 2
        shares = np.array([[s["new_class_share"] for s in r["states"]] for r in per])
        assert share[m]["share"] == pytest.approx(shares.mean(0).tolist())
        assert share[m]["std"] == pytest.approx(shares.std(0, ddof=1).tolist())
    confusion = confusion_data(dirs, results, repeat_dirs)
    for m in METHODS:
        rows = []
        for d in repeat_dirs[m]:
            z = np.load(d / "scores" / "state_01.npz")
            counts = np.zeros((7, 7))
            np.add.at(counts, (z["labels"], z["scores"].argmax(1)), 1)
            rows.append(100 * counts / counts.sum(1, keepdims=True))
        assert np.array(confusion[m]["matrix"]) == pytest.approx(np.mean(rows, 0))
        assert not np.allclose(rows[0], rows[1])  # the seeds differ: the mean is not the first run
    page = (runs / "report" / "report.html").read_text()
    assert "shown by their first run" not in page and "1st of" not in page
    for name in ("old_new", "confusion_last_state", "new_class_share", "top1_curve", "balanced_top1_curve"):
        caption = re.search(rf'<figure id="{name}">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)
        assert "over 2 seeds" in caption, name


@pytest.mark.slow
def test_annotations_of_two_seeds_are_their_mean(runs):
    per = _seeds(runs, "finetune")
    per[0]["states"][1]["annotations_per_class"] = {"4": 6, "5": 2}
    per[1]["states"][1]["annotations_per_class"] = {"4": 2, "6": 3}
    figs = {f.name: f for f in figures({"finetune": runs / "rep" / "finetune" / "run_0"}, {"finetune": per[0]},
                                       {"finetune": per})}
    assert "mean over 2 seeds" in figs["annotations_per_class.png"].caption
    bars = sorted(round(p.get_height(), 6) for p in figs["annotations_per_class.png"].figure.axes[0].patches)
    assert bars == [1.0, 1.5, 4.0]  # class 5: (2 + 0) / 2, class 6: (0 + 3) / 2, class 4: (6 + 2) / 2


@pytest.mark.slow
def test_the_balanced_curve_is_balanced_top1_per_state(runs, tmp_path):
    single = find_runs([runs / "rep" / "icarl" / "run_0"])[0]
    data = curve_data({"icarl": single.results}, key="balanced_top1")
    res = json.loads((runs / "rep" / "icarl" / "run_0" / "results.json").read_text())
    assert data["icarl"]["balanced_top1"] == [s["balanced_top1"] for s in res["states"]]
    assert data["icarl [cnn]"]["balanced_top1"] == [s["variants"]["cnn"]["balanced_top1"] for s in res["states"]]
    assert data["icarl"]["balanced_top1"] != [s["top1"] for s in res["states"]]  # not top-1 by another name
    dirs, results, repeats, repeat_dirs = _inputs(runs)
    figs = {f.name: f for f in figures(dirs, results, repeats, repeat_dirs=repeat_dirs)}
    lines = figs["balanced_top1_curve.png"].figure.axes[0].get_lines()
    assert [line.get_label().split(" (")[0] for line in lines] == ["finetune", "icarl", "icarl [cnn]"]
    for line, m in zip(lines, METHODS):
        values = np.array([[s["balanced_top1"] for s in r["states"]] for r in repeats[m]])
        assert line.get_ydata().tolist() == pytest.approx(values.mean(0).tolist())
    # a run without balanced top-1 (older results) is left out of that figure only
    old = _single(runs, tmp_path, "old", lambda r: [s.pop("balanced_top1") for s in r["states"]])
    figs = _figs([runs / "rep" / "icarl" / "run_0", old])
    labels = [line.get_label() for line in figs["balanced_top1_curve.png"].figure.axes[0].get_lines()]
    assert labels == ["icarl", "icarl [cnn]"]
    assert "old" in [line.get_label() for line in figs["top1_curve.png"].figure.axes[0].get_lines()]
