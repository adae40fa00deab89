"""Comparisons over repeated runs and several protocols: mean ± std tables, bands, paired tests."""

import contextlib
import csv
import io
import math

import numpy as np
import pytest
import yaml
from helpers import tiny_config

from cilkit.cli import main
from cilkit.analysis.plots import curve_data
from cilkit.analysis.report import compare_runs, find_runs
from cilkit.analysis.runsets import _labels, group_identity
from cilkit.runs.multirun import run_methods

SEEDS = [3, 4, 5]
T_975_DF2 = 4.302652729749  # Student's t, 97.5% quantile, 2 degrees of freedom (tables: 4.3027)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``cilkit run`` of finetune and iCaRL with runs: 3 and --baseline finetune (its printed
    output is kept), and one finetune run of another protocol (5 + 5 classes, memory 20)."""
    base = tmp_path_factory.mktemp("compare")
    cfg = tiny_config(base, "train.epochs=1", "threads=1", "scenario.states=2", "method=[finetune,icarl]")
    (base / "rep.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", str(base / "rep.yaml"), "--out", str(base / "rep"), "--set", "runs=3",
                     "--baseline", "finetune"])
    assert code == 0
    (base / "printed.txt").write_text(out.getvalue())
    other = tiny_config(base, "train.epochs=1", "threads=1", "scenario.initial=5", "scenario.increment=5",
                        "scenario.states=2", "memory.total=20")
    run_methods(other, base / "other", progress=False)
    return base


def _per_run(base, method):
    return [find_runs([base / "rep" / method / f"run_{k}"])[0].results for k in range(3)]


def _csv(path):
    with open(path) as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_repeated_runs_are_one_row_of_mean_and_sample_std(runs):
    rows = _csv(runs / "rep" / "report" / "table.csv")  # floats to 6 decimals
    assert list(rows) == ["finetune", "icarl", "icarl [cnn]"]
    for method in ("finetune", "icarl"):
        per_run, row = _per_run(runs, method), rows[method]
        assert (row["runs"], row["seeds"]) == ("3", "3, 4, 5")
        for b in range(2):
            values = [r["states"][b]["top1"] for r in per_run]
            assert float(row[f"top1_state{b + 1}"]) == pytest.approx(np.mean(values), abs=5e-7)
            assert float(row[f"top1_state{b + 1}_std"]) == pytest.approx(np.std(values, ddof=1), abs=5e-7)
        for key in ("mean_incremental_top1_excl_first", "average_forgetting", "wall_time_s"):
            values = [r[key] for r in per_run]
            assert float(row[key]) == pytest.approx(np.mean(values), abs=5e-7)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=5e-7)
    cnn = [r["states"][-1]["variants"]["cnn"]["top1"] for r in _per_run(runs, "icarl")]
    assert float(rows["icarl [cnn]"]["top1_state2_std"]) == pytest.approx(np.std(cnn, ddof=1), abs=5e-7)
    assert rows["icarl [cnn]"]["average_forgetting"] == ""  # not defined for a score set
    # the printed table (cilkit run) and table.md: mean ± std, runs and seeds, and what std means
    values = [r["mean_incremental_top1"] for r in _per_run(runs, "icarl")]
    cell = f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
    for text in ((runs / "printed.txt").read_text(), (runs / "rep" / "report" / "table.md").read_text()):
        assert "| method | runs | seeds | 4 cl. | 7 cl. |" in text
        assert "| icarl | 3 | 3, 4, 5 |" in text and cell in text
        assert "sample standard deviation, ddof=1" in text
    page = (runs / "rep" / "report" / "report.html").read_text()
    assert cell in page and "ddof=1" in page


def test_the_curve_of_repeated_runs_is_their_mean_with_a_std_band(runs):
    groups = {m: _per_run(runs, m) for m in ("finetune", "icarl")}
    data = curve_data({m: rs[0] for m, rs in groups.items()}, groups)
    top1 = np.array([[s["top1"] for s in r["states"]] for r in groups["finetune"]])
    assert data["finetune"]["top1"] == pytest.approx(top1.mean(axis=0).tolist())
    assert data["finetune"]["std"] == pytest.approx(top1.std(axis=0, ddof=1).tolist())
    assert data["finetune"]["runs"] == 3 and "std" in data["icarl [cnn]"]
    assert (runs / "rep" / "report" / "top1_curve.png").is_file()


def test_paired_difference_from_the_baseline(runs):
    key = "mean_incremental_top1_excl_first"
    diffs = [i[key] - f[key] for i, f in zip(_per_run(runs, "icarl"), _per_run(runs, "finetune"))]
    mean = sum(diffs) / 3
    half = T_975_DF2 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    with open(runs / "rep" / "report" / "paired.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["method"], row["baseline"], row["pairs"], row["seeds"]) == ("icarl", "finetune", "3", "3 4 5")
    assert float(row["mean_difference"]) == pytest.approx(mean, abs=1e-9)
    assert float(row["ci95_low"]) == pytest.approx(mean - half, abs=1e-6)
    assert float(row["ci95_high"]) == pytest.approx(mean + half, abs=1e-6)
    verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else "not distinguishable from finetune"
    assert row["verdict"] == verdict
    line = f"| icarl | 3 | 3, 4, 5 | {mean:+.2f} | [{mean - half:.2f}, {mean + half:.2f}] | {verdict} |"
    assert line in (runs / "printed.txt").read_text()
    assert line in (runs / "rep" / "report" / "table.md").read_text()
    assert "<h2>Paired comparison</h2>" in (runs / "rep" / "report" / "report.html").read_text()


def test_one_shared_seed_gives_no_interval_and_an_unknown_baseline_is_a_user_error(runs, tmp_path, capsys):
    one = [runs / "rep" / "finetune" / "run_0", runs / "rep" / "icarl" / "run_1", runs / "rep" / "icarl" / "run_0"]
    compare_runs(one, tmp_path / "one", echo=False, baseline="finetune")
    with open(tmp_path / "one" / "paired.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["pairs"], row["seeds"], row["ci95_low"]) == ("1", "3", "")
    assert row["verdict"] == "n/a (needs ≥ 2 shared seeds)"
    assert main(["compare", str(runs / "rep"), "--out", str(tmp_path / "bad"), "--baseline", "lucir"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'lucir'" in err and "finetune, icarl" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_runs_of_different_protocols_are_grouped_and_described_each_by_its_own_settings(runs, tmp_path):
    compare_runs([runs / "rep", runs / "other"], tmp_path / "two", echo=False)
    md = (tmp_path / "two" / "table.md").read_text()
    first, second = md.split("Protocol 2: ")
    assert first.startswith("Protocol 1: Dataset: digits. 2 states; classes seen after each state: 4, 7. "
                            "Backbone convnet; memory 60 exemplars (herding); epochs per state: 1; seeds 3, 4, 5.")
    assert second.startswith("Dataset: digits. 2 states; classes seen after each state: 5, 10. "
                             "Backbone convnet; memory 20 exemplars (herding); epochs per state: 1; seed 3.")
    assert "| finetune (protocol 1) | 3 | 3, 4, 5 |" in first and "| 4 cl. | 7 cl. |" in first
    assert "| finetune (protocol 2) |" in second and "| 5 cl. | 10 cl. |" in second
    page = (tmp_path / "two" / "report.html").read_text()
    assert "<li><b>Protocol 1</b>: Dataset: digits. 2 states; classes seen after each state: 4, 7." in page
    assert "<li><b>Protocol 2</b>: Dataset: digits. 2 states; classes seen after each state: 5, 10." in page
    rows = list(csv.DictReader(open(tmp_path / "two" / "table.csv")))
    assert [(r["protocol"], r["method"]) for r in rows] == [
        ("1", "finetune (protocol 1)"), ("1", "icarl"), ("1", "icarl [cnn]"), ("2", "finetune (protocol 2)")]


def test_a_single_run_table_is_as_before(runs, tmp_path):
    run = runs / "rep" / "icarl" / "run_0"
    r = find_runs([run])[0].results
    compare_runs([run], tmp_path / "single", echo=False)
    md = (tmp_path / "single" / "table.md").read_text()
    head, blank, *table = md.splitlines()  # the protocol header (issue 40 item 8), then the table as before
    assert head.startswith("Dataset: digits. 2 states; classes seen after each state: 4, 7.") and blank == ""
    assert table[0] == ("| method | 4 cl. | 7 cl. | mean inc. | mean inc. (excl. 1st) | bal. last | "
                        "bal. mean inc. | bal. mean inc. (excl. 1st) | last old | "
                        "last new | forgetting | time (s) | model MB | memory MB | total MB | model in ex. |")
    # ^ the last four: the last state's memory-aligned accounting (issue 39 item 5)
    assert table[2].startswith(f"| icarl | {r['states'][0]['top1']:.1f} | {r['states'][1]['top1']:.1f} | "
                                         f"{r['mean_incremental_top1']:.2f} |")
    assert "±" not in md and "ddof" not in md
    header = (tmp_path / "single" / "table.csv").read_text().splitlines()[0]
    assert header == ("method,top1_state1,top1_state2,mean_incremental_top1,mean_incremental_top1_excl_first,"
                      "balanced_top1_state1,balanced_top1_state2,mean_incremental_balanced_top1,"
                      "mean_incremental_balanced_top1_excl_first,"
                      "last_top1_old,last_top1_new,average_forgetting,wall_time_s,"
                      "last_model_mb,last_memory_mb,last_total_mb,last_model_in_exemplars")


def test_run_refuses_a_baseline_it_does_not_run(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "q"), "--methods", "finetune,icarl", "--baseline", "lucir"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'lucir' is not among the run's methods (finetune, icarl)" in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()


# ----- compare --regimes (docs/regimes.md) -----------------------------------------------------------
@pytest.fixture(scope="module")
def regime_runs(tmp_path_factory):
    """finetune (1 epoch, step schedule) and iCaRL (2 epochs, cosine) on one data protocol,
    seeds 3 and 4: two protocols to a plain compare, one to --regimes."""
    base = tmp_path_factory.mktemp("regimes")
    for method, sets in (("finetune", ["train.epochs=1"]),
                         ("icarl", ["train.epochs=2", "train.schedule.type=cosine"])):
        cfg = tiny_config(base, *sets, "threads=1", "scenario.states=2", f"method={method}")
        (base / f"{method}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        assert main(["run", str(base / f"{method}.yaml"), "--out", str(base / method), "--set", "runs=2"]) == 0
    return base


def test_regimes_pairs_methods_trained_differently_and_says_how(regime_runs, tmp_path, capsys):
    dirs = [str(regime_runs / "finetune"), str(regime_runs / "icarl")]
    assert main(["compare", *dirs, "--out", str(tmp_path / "plain"), "--baseline", "finetune"]) == 0
    plain = (tmp_path / "plain" / "table.md").read_text()
    assert "Protocol 2: " in plain and "| icarl | 2 |" not in plain.split("Paired")[-1]  # never paired across
    assert main(["compare", *dirs, "--out", str(tmp_path / "reg"), "--baseline", "finetune", "--regimes"]) == 0
    md = (tmp_path / "reg" / "table.md").read_text()
    assert "Protocol 2" not in md
    assert ("Training differs by method (--regimes), from finetune's: icarl: epochs 2, schedule.type cosine."
            in md)
    key = "mean_incremental_top1_excl_first"
    ft = [find_runs([regime_runs / "finetune" / f"run_{k}"])[0].results[key] for k in range(2)]
    ic = [find_runs([regime_runs / "icarl" / f"run_{k}"])[0].results[key] for k in range(2)]
    with open(tmp_path / "reg" / "paired.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["method"], row["pairs"]) == ("icarl", "2")
    assert float(row["mean_difference"]) == pytest.approx(sum(i - f for i, f in zip(ic, ft)) / 2, abs=1e-9)


def test_the_baseline_heads_the_table_and_the_regimes_sentence_whatever_the_order(regime_runs, tmp_path):
    """Named after the method it is compared with, the baseline still comes first: its row heads
    the table and the training differences are said against its settings, not the first directory's."""
    dirs = [str(regime_runs / "icarl"), str(regime_runs / "finetune")]
    assert main(["compare", *dirs, "--out", str(tmp_path / "rev"), "--baseline", "finetune", "--regimes"]) == 0
    md = (tmp_path / "rev" / "table.md").read_text()
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and " | 2 | " in line]
    assert rows[:2] == ["| finetune", "| icarl"]
    assert "from finetune's: icarl: epochs 2, schedule.type cosine." in md
    assert main(["compare", *dirs, "--out", str(tmp_path / "plain"), "--regimes"]) == 0  # no baseline: as named
    assert "from icarl's: finetune: epochs 1, schedule.type multistep." in (tmp_path / "plain" / "table.md").read_text()


def test_regimes_labels_twins_by_the_option_or_setting_they_differ_in():
    """Under --regimes a group's identity holds its training settings too; twins of one method
    are still labelled by what differs (WA's two readings, PODNet's two schedules), never by path."""
    train = {"train.epochs": 5, "train.schedule.type": "multistep"}
    paper = group_identity('{"bias": false, "clip": "always"}', train)
    pycil = group_identity('{"bias": true, "clip": "never"}', train)
    cosine = group_identity('{"bias": false, "clip": "always"}', {**train, "train.schedule.type": "cosine"})
    groups = [("wa", 1, [("runs/a", 0)]), ("wa", 1, [("runs/b", 0)]), ("wa", 1, [("runs/c", 0)])]
    assert _labels(groups, False, [paper, pycil, cosine]) == [
        "wa (bias=False, clip=always, train.schedule.type=multistep)",
        "wa (bias=True, clip=never, train.schedule.type=multistep)",
        "wa (bias=False, clip=always, train.schedule.type=cosine)"]
    assert _labels(groups[:2], False, [paper, pycil]) == ["wa (bias=False, clip=always)", "wa (bias=True, clip=never)"]
    assert group_identity('{"bias": false}', {}) == '{"bias": false}'  # without --regimes: the options alone
