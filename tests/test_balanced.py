"""Balanced top-1 (the mean per-class accuracy) beside top-1 in every table and in the paired
comparison: on an imbalanced test set the two tell different stories (issue 26, item 1)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from helpers import tiny_config
from scipy import stats

from cilkit.analysis.report import compare_runs
from cilkit.cli import main
from cilkit.run.loop import Run

LONGTAIL = ("scenario.imbalance.profile=longtail", "scenario.imbalance.ratio=10",
            "scenario.imbalance.apply_to_test=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Long-tail runs on digits with the imbalance on the test set too: finetune with seeds 3
    and 4, icarl with seeds 3 and 4 (2 states, 1 epoch, one thread)."""
    base = tmp_path_factory.mktemp("balanced")
    for method in ("finetune", "icarl"):
        for seed in (3, 4):
            cfg = tiny_config(base, *LONGTAIL, "train.epochs=1", "threads=1", "scenario.states=3",
                              f"method={method}", f"seed={seed}", "state0_cache=null")
            Run(cfg, base / "runs" / f"{method}-{seed}", progress=False).execute()
    return base / "runs"


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def balanced(run_dir: Path) -> list[float]:
    return [s["balanced_top1"] for s in results(run_dir)["states"]]


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The first Markdown table of ``text`` as ``{heading: cell}`` rows."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(heads, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]
            if not ln.startswith("|---")]


def test_the_imbalanced_test_set_makes_balanced_differ_from_top1(runs):
    """The premise: with the long tail on the test set, top-1 and balanced top-1 differ."""
    r = results(runs / "finetune-3")
    assert any(abs(s["top1"] - s["balanced_top1"]) > 1.0 for s in r["states"])


def test_single_run_tables_show_balanced_top1_beside_top1(runs, tmp_path):
    run = runs / "finetune-3"
    out = compare_runs([run], tmp_path / "one", echo=False)
    per_state = balanced(run)
    (row,) = markdown_rows((out / "table.md").read_text())
    assert float(row["bal. last"]) == pytest.approx(per_state[-1], abs=0.05)
    assert float(row["bal. mean inc."]) == pytest.approx(sum(per_state) / len(per_state), abs=0.005)
    assert float(row["bal. mean inc. (excl. 1st)"]) == pytest.approx(sum(per_state[1:]) / 2, abs=0.005)
    (line,) = csv.DictReader(io.StringIO((out / "table.csv").read_text()))
    assert [float(line[f"balanced_top1_state{b + 1}"]) for b in range(3)] == pytest.approx(per_state, abs=1e-6)
    assert float(line["mean_incremental_balanced_top1_excl_first"]) == pytest.approx(sum(per_state[1:]) / 2, abs=1e-6)
    assert "bal. last" not in line  # the CSV has the per-state columns instead
    html = (out / "report.html").read_text()
    assert "<th>bal. mean inc.</th>" in html and "<th>bal. last</th>" in html
    assert "<em>bal.</em>: balanced top-1, the mean of the per-class accuracies" in html  # the legend says so
    tex = (out / "table.tex").read_text()
    assert r"bal. mean inc." in tex and "balanced\\_top1\\_state" not in tex


def test_the_console_table_of_cilkit_run_shows_balanced_top1(tmp_path, capsys):
    args = ["run", "--set", "method=finetune", "--set", "scenario.states=2", "--set", "train.epochs=1",
            "--set", "threads=1", "--set", "state0_cache=null", "--out", str(tmp_path / "r")]
    args += [x for kv in LONGTAIL for x in ("--set", kv)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    (row,) = markdown_rows(printed[printed.index("| method"):])
    assert float(row["bal. last"]) == pytest.approx(balanced(tmp_path / "r")[-1], abs=0.05)


def test_the_first_line_and_every_table_name_the_imbalance_profile(tmp_path, capsys):
    """Issue 40 item 8: the run's first line, the console table and table.md name the profile
    as report.html's protocol header does, in the one text of ``describe_imbalance``."""
    from cilkit.cil.scenario import describe_imbalance

    out = tmp_path / "r"
    args = ["run", "--set", "method=finetune", "--set", "scenario.states=2", "--set", "train.epochs=1",
            "--set", "threads=1", "--set", "state0_cache=null", "--out", str(out)]
    assert main(args + [x for kv in LONGTAIL for x in ("--set", kv)]) == 0
    printed = capsys.readouterr().out
    record = results(out)["imbalance"]
    text = describe_imbalance(record).strip()
    assert text.startswith("Imbalance: longtail, ratio 10.0; ") and text.endswith("applied to the test set too.")
    assert f"{max(record['train_per_class'])} to {min(record['train_per_class'])} training images per class" in text
    first = printed.splitlines()[0]
    assert first.startswith("[finetune] digits: ") and first.endswith(f"; seed 0. {text}")
    assert text in printed[:printed.index("| method")]  # the console table's header, above the table
    table_md = (out / "report" / "table.md").read_text()
    assert text in table_md[:table_md.index("| method")]
    assert text in (out / "report" / "report.html").read_text()
    # a balanced stream: nothing said, the first line ends with the seed as before
    assert main(args[:-2] + ["--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].endswith("; seed 0") and "Imbalance" not in printed


def test_repeated_runs_show_mean_and_std_of_balanced_top1(runs, tmp_path):
    out = compare_runs([runs / "finetune-3", runs / "finetune-4"], tmp_path / "two", echo=False)
    (row,) = markdown_rows((out / "table.md").read_text())
    excl = [sum(balanced(runs / f"finetune-{s}")[1:]) / 2 for s in (3, 4)]
    mean, std = row["bal. mean inc. (excl. 1st)"].split(" ± ")
    assert float(mean) == pytest.approx(statistics.mean(excl), abs=0.005)
    assert float(std) == pytest.approx(statistics.stdev(excl), abs=0.005)


def test_compare_baseline_metric_balanced_pairs_the_balanced_means(runs, tmp_path):
    dirs = [str(runs / f"{m}-{s}") for m in ("finetune", "icarl") for s in (3, 4)]
    assert main(["compare", *dirs, "--out", str(tmp_path / "p"), "--baseline", "finetune",
                 "--metric", "balanced_top1"]) == 0
    (line,) = csv.DictReader(io.StringIO((tmp_path / "p" / "paired.csv").read_text()))
    diffs = [sum(balanced(runs / f"icarl-{s}")[1:]) / 2 - sum(balanced(runs / f"finetune-{s}")[1:]) / 2
             for s in (3, 4)]
    mean = statistics.mean(diffs)
    half = stats.t.ppf(0.975, 1) * statistics.stdev(diffs) / 2 ** 0.5
    assert line["metric"] == "mean_incremental_balanced_top1_excl_first"
    assert float(line["mean_difference"]) == pytest.approx(mean, abs=1e-9)
    assert float(line["ci95_low"]) == pytest.approx(mean - half, abs=1e-6)
    assert float(line["ci95_high"]) == pytest.approx(mean + half, abs=1e-6)
    text = (tmp_path / "p" / "table.md").read_text()
    assert "mean incremental balanced top-1 (mean per-class accuracy)" in text
    top1 = [results(runs / f"icarl-{s}")["mean_incremental_top1_excl_first"]
            - results(runs / f"finetune-{s}")["mean_incremental_top1_excl_first"] for s in (3, 4)]
    assert abs(statistics.mean(top1) - mean) > 1e-6  # the two metrics really are different figures


def test_compare_metric_bogus_is_one_error_line(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(runs / "finetune-3"), "--out", str(tmp_path / "x"), "--metric", "top5"])
    assert e.value.code == 2
    assert "--metric" in capsys.readouterr().err
