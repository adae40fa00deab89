"""Comparison reports: the data behind each plot, the PNGs, the tables, report.html, errors."""

import base64
import csv
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from helpers import tiny_config
from PIL import Image

from cilkit.cli import main
from cilkit.common.errors import UserError
from cilkit.analysis.plots import (
    annotation_data,
    confusion_data,
    curve_data,
    new_share_data,
    old_new_data,
    true_new_share,
)
from cilkit.analysis.report import compare_runs, describe_memory, find_runs
from cilkit.runs.multirun import run_methods


def _colours(rgb):
    """How many distinct RGB colours an (H, W, 3) uint8 image holds."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    return len(np.unique(packed))


PLOTS = ["top1_curve.png", "balanced_top1_curve.png", "old_new.png", "confusion_last_state.png", "new_class_share.png"]
ANNOTATIONS = {1: {"0": 7, "3": 2, "5": 4}, 2: {"8": 1, "9": 6, "1": 3}}  # state -> class -> count


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real two-method comparison (1 epoch) and, beside it, an 'active' run made from the
    fine-tuning run with ``annotations_per_class`` added to its states."""
    base = tmp_path_factory.mktemp("report")
    run_methods(tiny_config(base, "train.epochs=1", "threads=1", "method=[finetune,icarl]"), base / "cmp", progress=False)
    active = base / "active"
    shutil.copytree(base / "cmp" / "finetune", active)
    res = json.loads((active / "results.json").read_text())
    res["method"] = "active"
    for b, counts in ANNOTATIONS.items():
        res["states"][b]["annotations_per_class"] = counts
    (active / "results.json").write_text(json.dumps(res))
    compare_runs([base / "cmp"], echo=False)
    compare_runs([base / "cmp", active], base / "with_active", echo=False)
    return base


def _results(base):
    return {r.label: r.results for r in find_runs([base / "cmp"])}


@pytest.mark.slow
def test_a_parent_directory_gives_its_methods_in_config_order(runs, tmp_path):
    assert [(r.label, r.path) for r in find_runs([runs / "cmp"])] == [
        ("finetune", runs / "cmp" / "finetune"), ("icarl", runs / "cmp" / "icarl")]
    ft = runs / "cmp" / "finetune"
    assert [r.label for r in find_runs([runs / "cmp", ft])] == ["finetune", "icarl"]  # a run named twice: once
    shutil.copytree(ft, tmp_path / "again")
    assert [r.label for r in find_runs([ft, tmp_path / "again"])] == [
        f"finetune ({ft})", f"finetune ({tmp_path / 'again'})"]  # two runs of one method: told apart


def test_curve_data_is_top1_per_state_from_results(runs):
    results = _results(runs)
    data = curve_data(results)
    assert list(data) == ["finetune", "icarl", "icarl [cnn]"]
    for label, r in results.items():
        assert data[label]["classes"] == [4, 7, 10] == r["state_ends"]
        assert data[label]["top1"] == [s["top1"] for s in r["states"]]
    assert data["icarl [cnn]"]["top1"] == [s["variants"]["cnn"]["top1"] for s in results["icarl"]["states"]]
    assert data["icarl [cnn]"]["base"] == "icarl"


def test_old_new_and_new_share_data_come_from_results(runs):
    results = _results(runs)
    old_new, share = old_new_data(results), new_share_data(results)
    for label, r in results.items():
        assert old_new[label]["old"] == [s["top1_old"] for s in r["states"]]
        assert old_new[label]["old"][0] is None
        assert old_new[label]["new"] == [s["top1_new"] for s in r["states"]]
        assert share[label]["share"] == [s["new_class_share"] for s in r["states"]]
    # the fine-tuning bias the methods fight: fine-tuning predicts new classes more than iCaRL
    assert share["finetune"]["share"][-1] > share["icarl"]["share"][-1]


def test_confusion_matrix_is_the_last_state_argmax_against_labels(runs):
    results = _results(runs)
    dirs = {r.label: r.path for r in find_runs([runs / "cmp"])}
    data = confusion_data(dirs, results)
    for label, r in results.items():
        m = np.array(data[label]["matrix"])
        z = np.load(dirs[label] / "scores" / "state_02.npz")
        assert m.shape == (10, 10)
        assert (m.sum(axis=1) == np.bincount(z["labels"], minlength=10)).all()
        assert 100 * np.trace(m) / m.sum() == pytest.approx(r["states"][-1]["top1"])
        assert data[label]["classes"] == r["class_order"]
        assert data[label]["names"] == r["class_names"] and len(r["class_names"]) == 10  # digits: "0".."9"
        assert data[label]["state_ends"] == [4, 7, 10]
    # the reference share of new-class test images is read from the stored labels
    labels = np.load(dirs["icarl"] / "scores" / "state_01.npz")["labels"]
    assert true_new_share(dirs["icarl"], results["icarl"])[1] == pytest.approx(100 * (labels >= 4).mean())


def test_annotation_data_only_for_active_runs(runs):
    results = {r.label: r.results for r in find_runs([runs / "cmp", runs / "active"])}
    data = annotation_data(results)
    assert list(data) == ["active"]
    d = data["active"]
    assert d["states"] == [1, 2] and d["classes"] == ["0", "1", "3", "5", "8", "9"]
    for i, b in enumerate(d["states"]):
        assert {c: v for c, v in zip(d["classes"], d["counts"][i]) if v is not None} == ANNOTATIONS[b]
    assert not (runs / "cmp" / "report" / "annotations_per_class.png").exists()
    assert (runs / "with_active" / "annotations_per_class.png").is_file()


@pytest.mark.parametrize("report", ["cmp/report", "with_active"])
def test_every_plot_is_a_real_image(runs, report):
    names = PLOTS + (["annotations_per_class.png"] if report == "with_active" else [])
    for name in names:
        with Image.open(runs / report / name) as im:
            im.verify()
        with Image.open(runs / report / name) as im:
            rgb = np.asarray(im.convert("RGB"))
        assert rgb.shape[0] > 100 and rgb.shape[1] > 100, name
        assert _colours(rgb) > 20, f"{name} is (almost) one flat colour"


def test_table_csv_and_md_hold_the_run_values(runs):
    results = _results(runs)
    with open(runs / "cmp" / "report" / "table.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["finetune", "icarl", "icarl [cnn]"]
    for label, r in results.items():
        row = rows[label]
        for b, s in enumerate(r["states"]):
            assert float(row[f"top1_state{b + 1}"]) == round(s["top1"], 6)
        for key in ("mean_incremental_top1", "mean_incremental_top1_excl_first", "average_forgetting", "wall_time_s"):
            assert float(row[key]) == round(r[key], 6)
        assert float(row["last_top1_old"]) == round(r["states"][-1]["top1_old"], 6)
        assert float(row["last_top1_new"]) == round(r["states"][-1]["top1_new"], 6)
        # floats to 6 decimals: no 70.39999999999999 (a float's repr artefact) in the CSV
        assert all(len(v.split(".")[1]) <= 6 for v in row.values() if v.replace(".", "", 1).isdigit() and "." in v)
    cnn = [s["variants"]["cnn"]["top1"] for s in results["icarl"]["states"]]
    assert float(rows["icarl [cnn]"]["mean_incremental_top1"]) == pytest.approx(np.mean(cnn))
    assert rows["icarl [cnn]"]["average_forgetting"] == ""  # not defined for a score variant
    md = (runs / "cmp" / "report" / "table.md").read_text()
    icarl = results["icarl"]
    assert f"| icarl | {icarl['states'][0]['top1']:.1f} |" in md
    assert f"{icarl['mean_incremental_top1_excl_first']:.2f}" in md


def test_report_html_is_self_contained(runs):
    page = (runs / "with_active" / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    files = [(runs / "with_active" / n).read_bytes() for n in PLOTS + ["annotations_per_class.png"]]
    assert sorted(base64.b64decode(u) for u in uris) == sorted(files)
    assert "<table>" in page and "<td>icarl [cnn]</td>" in page and "<td>active</td>" in page
    assert not re.search(r'(src|href)="(?!data:)', page), "an external resource"
    assert "<script" not in page and "<link" not in page


def test_missing_or_corrupt_results_are_user_errors(runs, tmp_path, capsys):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "nothing" / "results.json"))):
        compare_runs([tmp_path / "nothing"])
    bad = tmp_path / "bad"
    shutil.copytree(runs / "cmp" / "finetune", bad)
    (bad / "results.json").write_text("{ not json")
    assert main(["compare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad / "results.json") in err and err.count("\n") == 1
    res = json.loads((runs / "cmp" / "finetune" / "results.json").read_text())
    del res["states"][1]["top1_new"]
    (bad / "results.json").write_text(json.dumps(res))
    with pytest.raises(UserError, match=re.escape(f"'{bad / 'results.json'}' is not a cilkit results file")):
        compare_runs([bad])
    (bad / "results.json").write_text((runs / "cmp" / "finetune" / "results.json").read_text())
    (bad / "scores" / "state_02.npz").unlink()
    with pytest.raises(UserError, match="state_02.npz"):
        compare_runs([bad])
    assert not (bad / "report").exists(), "nothing written when an input is missing"


@pytest.mark.slow
def test_cilkit_run_prints_the_table_and_writes_the_report(tmp_path, capsys):
    code = main(["run", "--out", str(tmp_path / "q"), "--set", "train.epochs=1", "--set", "scenario.states=2",
                 "--set", "model.width=8", "--set", "threads=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| finetune |" in out and "| icarl [cnn] |" in out
    report = tmp_path / "q" / "report"
    assert {p.name for p in report.iterdir()} == {"table.md", "table.csv", "table.tex", "report.html", *PLOTS,
                                                  *(p.replace(".png", ".pdf") for p in PLOTS)}


def _screenshot(html_file, png, profile):
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1400,3000", html_file.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_a_headless_browser(runs, tmp_path):
    page = (runs / "with_active" / "report.html").read_text()
    no_images = tmp_path / "no_images.html"
    no_images.write_text(re.sub(r"<img [^>]*>", "", page))
    full = _screenshot(runs / "with_active" / "report.html", tmp_path / "full.png", tmp_path / "p1")
    bare = _screenshot(no_images, tmp_path / "bare.png", tmp_path / "p2")
    dark_pixels = int((bare.max(axis=2) < 100).sum())  # text and table borders
    assert dark_pixels > 2000, "the table and captions did not render"
    assert _colours(full) > 1000 and _colours(full) > 5 * _colours(bare), "the plots did not render"
    assert (full != bare).any(axis=2).mean() > 0.1, "the plots cover little of the page"


_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img")];
  document.body.dataset.decoded = imgs.map(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().height > 50).join(",");
  document.body.dataset.tableRows = document.querySelectorAll("table tr").length;
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_every_plot_and_the_table_are_displayed_by_the_browser(runs, tmp_path):
    """Chromium decodes and lays out every embedded plot (no network: the page is offline) and
    renders the table with a row per method and score set."""
    decoded, rows = _browser_probe(runs / "with_active" / "report.html", tmp_path)
    assert len(decoded) == len(PLOTS) + 1 and all(d == "true" for d in decoded), decoded
    assert rows >= 1 + 3  # header + finetune, icarl, icarl [cnn], active ...


def _browser_probe(report, tmp_path) -> tuple[list[str], int]:
    """Open ``report`` in headless Chromium with the probe script: whether each image decoded,
    and the number of table rows laid out."""
    # the probe is the page's only script: let the page's CSP (no fetch, data: images) run it
    page = report.read_text().replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", _PROBE + "</body>"))
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         f"--user-data-dir={tmp_path / 'p'}", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    decoded = re.search(r'data-decoded="([^"]*)"', dom).group(1).split(",")
    return decoded, int(re.search(r'data-table-rows="(\d+)"', dom).group(1))


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_never_cover_the_curves_even_with_eleven_runs():
    from cilkit.analysis.plots import plot_curves, plot_new_share, plot_old_new

    classes = [2, 4, 6, 8, 10]
    curves = {f"method-{k}-with-a-long-name": {"classes": classes, "top1": [90.0 - k] * 5, "base": f"method-{k}-with-a-long-name"}
              for k in range(11)}
    shares = {k: {"classes": classes, "share": [50.0] * 5} for k in curves}
    old_new = {"finetune": {"classes": classes, "old": [None, 0.0, 0.0, 0.0, 0.0], "new": [90.0, 99.0, 98.0, 97.0, 99.0]}}
    for fig in (plot_curves(curves), plot_new_share(shares), plot_old_new(old_new)):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)
        assert legends
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1  # inside the image
            for ax in fig.axes:
                if ax.get_visible():
                    assert not _overlaps(box, ax.get_window_extent(renderer)), "a legend covers a plot"


def test_confusion_matrices_are_labelled_with_class_names():
    from cilkit.analysis.plots import plot_confusion

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    fig = plot_confusion({"finetune": {"matrix": np.eye(4).tolist(), "classes": [0, 1, 2, 3], "names": names,
                                       "state_ends": [2, 4]}})
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names


def _eleven_runs(runs, tmp_path):
    """11 runs: copies of the fine-tuning run, each named as another method."""
    dirs = []
    for k in range(11):
        d = tmp_path / f"m{k}"
        shutil.copytree(runs / "cmp" / "finetune", d, ignore=shutil.ignore_patterns("checkpoints", "report"))
        res = json.loads((d / "results.json").read_text())
        res["method"] = f"method-{k}"
        res["states"] = [{**s, "top1": s["top1"] - 2 * k} for s in res["states"]]
        (d / "results.json").write_text(json.dumps(res))
        dirs.append(d)
    return dirs


def test_eleven_runs_get_eleven_distinct_curve_styles(runs, tmp_path):
    from cilkit.analysis.plots import curve_data, plot_curves

    dirs = _eleven_runs(runs, tmp_path)
    results = {r.label: r.results for r in find_runs(dirs)}
    fig = plot_curves(curve_data(results))
    styles = {(line.get_color(), line.get_marker()) for line in fig.axes[0].get_lines()}
    assert len(styles) == 11


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_a_report_of_eleven_runs_renders_every_figure_in_the_browser(runs, tmp_path):
    dirs = _eleven_runs(runs, tmp_path)
    compare_runs(dirs, tmp_path / "report", echo=False)
    decoded, rows = _browser_probe(tmp_path / "report" / "report.html", tmp_path)
    assert decoded and all(d == "true" for d in decoded), decoded
    assert rows >= 1 + 11
    curve = Image.open(tmp_path / "report" / "top1_curve.png").convert("RGB")
    assert curve.width > curve.height * 1.5  # room for the legend beside the axes


def test_the_report_says_where_each_run_was_made(runs):
    import html as _html

    from cilkit.analysis.report import provenance_line

    page = _html.unescape((runs / "cmp" / "report" / "report.html").read_text())
    for label in ("finetune", "icarl"):
        prov = json.loads((runs / "cmp" / label / "results.json").read_text())["provenance"]
        line = provenance_line(prov)
        assert line in page
        assert prov["torch"] in line and prov["device_name"] in line and f"{prov['threads']} threads" in line
    assert provenance_line(None) == ""  # a run from before the record: no line


@pytest.mark.slow
def test_memory_is_described_as_the_run_describes_it(runs, tmp_path):
    assert describe_memory({"total": 60, "per_class": None, "selection": "herding"}) == "60 exemplars (herding)"
    assert describe_memory({"total": None, "per_class": 20, "selection": "random"}) == "20 per class (random)"
    for none in ({"total": None, "per_class": None, "selection": "herding"}, {"total": 0}, {"per_class": 0}, {}, None):
        assert describe_memory(none) == "none"
    # a run without memory: "memory none", not "None per class"
    run = tmp_path / "no_memory"
    shutil.copytree(runs / "cmp" / "finetune", run, ignore=shutil.ignore_patterns("checkpoints", "report"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["memory"] = {"total": None, "per_class": None, "selection": "herding"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    compare_runs([run], tmp_path / "report", echo=False)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Backbone convnet; memory none; epochs per state: 1; seed 3." in page
