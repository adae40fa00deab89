"""Many-, medium- and few-shot top-1 (issue 38 item 7): the long-tail literature's accuracy by
training images per class, after every state in results.json, in every table, the report's
figures and ``compare --metric``; a protocol without a long tail shows none of it."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config
from scipy import stats

from cilkit.analysis.calibrate import calibrate_run
from cilkit.analysis.report import compare_runs
from cilkit.cil.shots import SHOT_KEYS, shot_accuracies, shot_summary
from cilkit.cli import main
from cilkit.run.loop import Run

LONGTAIL = ("scenario.imbalance.profile=longtail", "scenario.imbalance.ratio=10")
GROUP_WORDS = ("many", "medium", "few")


# ----- the figures by hand ---------------------------------------------------------------------
def test_six_classes_by_hand():
    """Counts [150, 100, 50, 20, 19, 3]: many-shot {0} (more than 100), medium-shot {1, 2, 3}
    (20 to 100, both ends included), few-shot {4, 5} (fewer than 20)."""
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 4, 5])
    pred = torch.tensor([0, 1, 1, 1, 0, 3, 2, 4, 0, 0])  # right: 0 | 1, 1, 3 | 4
    scores = torch.nn.functional.one_hot(pred, 6).float()
    got = shot_accuracies(scores, labels, [150, 100, 50, 20, 19, 3])
    assert got["many_shot_top1"] == pytest.approx(100 * 1 / 2)
    assert got["medium_shot_top1"] == pytest.approx(100 * 3 / 5)
    assert got["few_shot_top1"] == pytest.approx(100 * 1 / 3)


def test_a_group_without_a_seen_class_has_no_figure_and_the_thresholds_are_the_configs():
    labels = torch.tensor([0, 1, 1])
    scores = torch.nn.functional.one_hot(torch.tensor([0, 0, 1]), 2).float()
    got = shot_accuracies(scores, labels, [150, 50, 3])  # class 2 (few-shot) not seen yet
    assert got == {"many_shot_top1": 100.0, "medium_shot_top1": 50.0, "few_shot_top1": None}
    scaled = shot_accuracies(scores, labels, [150, 50, 3], many=1000, few=100)  # 150 medium, 50 and 3 few
    assert scaled == {"many_shot_top1": None, "medium_shot_top1": 100.0, "few_shot_top1": 50.0}


def test_the_summary_means_the_states_in_which_the_group_has_a_class():
    states = [{"many_shot_top1": 80.0, "medium_shot_top1": None, "few_shot_top1": None},
              {"many_shot_top1": 60.0, "medium_shot_top1": 40.0, "few_shot_top1": None},
              {"many_shot_top1": 50.0, "medium_shot_top1": 30.0, "few_shot_top1": 10.0}]
    s = shot_summary(states)
    assert s["mean_incremental_many_shot_top1"] == pytest.approx(190 / 3)
    assert s["mean_incremental_many_shot_top1_excl_first"] == pytest.approx(55.0)
    assert s["mean_incremental_medium_shot_top1"] == pytest.approx(35.0)
    assert s["mean_incremental_few_shot_top1_excl_first"] == pytest.approx(10.0)
    assert s["last_few_shot_top1"] == 10.0
    assert shot_summary([{"top1": 50.0}]) == {}


# ----- runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Long-tailed runs on digits (training images 10x fewer for the smallest class; the test
    set balanced): finetune and icarl with seeds 3 and 4; a balanced finetune and icarl run."""
    base = tmp_path_factory.mktemp("shots")
    common = ("train.epochs=1", "threads=1", "scenario.states=3", "state0_cache=null")
    for method in ("finetune", "icarl"):
        for seed in (3, 4):
            Run(tiny_config(base, *LONGTAIL, *common, f"method={method}", f"seed={seed}"),
                base / "lt" / f"{method}-{seed}", progress=False).execute()
        Run(tiny_config(base, *common, f"method={method}"), base / "flat" / method, progress=False).execute()
    return base


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def by_hand(scores: np.ndarray, labels: np.ndarray, counts: list[int]) -> dict[str, float | None]:
    """The groups' top-1 from stored scores, written again here: group of each test image from
    its class's training count, then the share of right argmaxes per group."""
    counts_np = np.asarray(counts)
    group_of_class = np.where(counts_np > 100, 0, np.where(counts_np < 20, 2, 1))
    right = scores.argmax(axis=1) == labels
    group = group_of_class[labels]
    return {f"{g}_shot_top1": (100.0 * right[group == k].mean() if (group == k).any() else None)
            for k, g in enumerate(GROUP_WORDS)}


def test_a_long_tailed_run_writes_the_three_figures_after_every_state(runs):
    run = runs / "lt" / "icarl-3"
    r = results(run)
    counts = r["imbalance"]["train_per_class"]
    assert max(counts) > 100 and min(counts) < 20  # the protocol spans the three groups
    for s in r["states"]:
        npz = np.load(run / "scores" / f"state_{s['state']:02d}.npz")
        expected = by_hand(npz["scores"], npz["labels"], counts)
        for key in SHOT_KEYS:
            assert key in s
            assert s[key] == (None if expected[key] is None else pytest.approx(expected[key], abs=1e-9))
        cnn = by_hand(npz["scores_cnn"], npz["labels"], counts)  # the other score set too
        for key in SHOT_KEYS:
            assert s["variants"]["cnn"][key] == (None if cnn[key] is None else pytest.approx(cnn[key], abs=1e-9))
    last = by_hand(*(lambda z: (z["scores"], z["labels"]))(np.load(run / "scores" / "state_02.npz")), counts)
    assert r["last_few_shot_top1"] == pytest.approx(last["few_shot_top1"])
    per_state = [s["medium_shot_top1"] for s in r["states"] if s["medium_shot_top1"] is not None]
    assert r["mean_incremental_medium_shot_top1"] == pytest.approx(sum(per_state) / len(per_state))


def test_a_balanced_run_writes_none_of_them(runs):
    r = results(runs / "flat" / "icarl")
    text = json.dumps(r)
    assert "_shot_top1" not in text


def test_calibrate_recomputes_them_from_the_rectified_scores(runs, tmp_path):
    src = runs / "lt" / "finetune-3"
    out = calibrate_run(src, "scaling", tmp_path / "scaling", echo=False)[""]
    counts = out["imbalance"]["train_per_class"]
    for s in out["states"]:
        npz = np.load(tmp_path / "scaling" / "scores" / f"state_{s['state']:02d}.npz")
        expected = by_hand(npz["scores"], npz["labels"], counts)
        assert [s[k] for k in SHOT_KEYS] == [None if expected[k] is None else pytest.approx(expected[k])
                                             for k in SHOT_KEYS]
    assert "last_many_shot_top1" in out


# ----- tables, report, compare -----------------------------------------------------------------
def markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(heads, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_every_table_of_a_long_tailed_protocol_has_the_columns(runs, tmp_path):
    dirs = [runs / "lt" / f"{m}-{s}" for m in ("finetune", "icarl") for s in (3, 4)]
    out = compare_runs(dirs, tmp_path / "c", echo=False)
    per_seed = [results(runs / "lt" / f"finetune-{s}")["states"][-1]["few_shot_top1"] for s in (3, 4)]
    md = (out / "table.md").read_text()
    row = next(r for r in markdown_rows(md) if r["method"] == "finetune")
    mean, std = (float(x) for x in row["few last"].split(" ± "))
    assert mean == pytest.approx(statistics.mean(per_seed), abs=0.05)
    assert std == pytest.approx(statistics.stdev(per_seed), abs=0.05)
    assert "many mean inc." in row and "medium last" in row
    assert "few-shot fewer than 20" in md  # the protocol says what the groups are
    line = next(x for x in csv.DictReader(io.StringIO((out / "table.csv").read_text())) if x["method"] == "finetune")
    assert float(line["few_shot_top1_state3"]) == pytest.approx(statistics.mean(per_seed), abs=1e-6)
    assert float(line["last_few_shot_top1"]) == pytest.approx(statistics.mean(per_seed), abs=1e-6)
    assert "mean_incremental_many_shot_top1_excl_first" in line
    tex = (out / "table.tex").read_text()
    assert "few last" in tex and "many last" in tex and "few-shot top-1" in tex
    html = (out / "report.html").read_text()
    assert "<th>few last</th>" in html and "<th>many mean inc.</th>" in html
    assert 'id="shot_groups"' in html and (out / "shot_groups.pdf").is_file()


def test_a_balanced_protocol_shows_no_such_column(runs, tmp_path):
    out = compare_runs([runs / "flat" / "finetune", runs / "flat" / "icarl"], tmp_path / "flat", echo=False)
    for name in ("table.md", "table.csv", "table.tex", "report.html"):
        text = (out / name).read_text()
        for word in ("_shot_top1", "-shot", "few last", "many mean inc.", "id=\"shot_groups\""):
            assert word not in text, (name, word)
    assert not (out / "shot_groups.png").exists()


@pytest.mark.parametrize("metric", ["few_shot_top1", "many_shot_top1", "last_many_shot_top1"])
def test_compare_metric_pairs_a_shot_figure(runs, tmp_path, metric):
    dirs = [str(runs / "lt" / f"{m}-{s}") for m in ("finetune", "icarl") for s in (3, 4)]
    assert main(["compare", *dirs, "--out", str(tmp_path / "p"), "--baseline", "finetune", "--metric", metric]) == 0
    (line,) = csv.DictReader(io.StringIO((tmp_path / "p" / "paired.csv").read_text()))

    def figure(run: Path) -> float:
        values = [s[metric.removeprefix("last_")] for s in results(run)["states"]]
        if metric.startswith("last_"):
            return values[-1]
        known = [v for v in values[1:] if v is not None]  # excluding state 1, over the states with the group
        return sum(known) / len(known)

    diffs = [figure(runs / "lt" / f"icarl-{s}") - figure(runs / "lt" / f"finetune-{s}") for s in (3, 4)]
    mean, half = statistics.mean(diffs), stats.t.ppf(0.975, 1) * statistics.stdev(diffs) / 2 ** 0.5
    assert float(line["mean_difference"]) == pytest.approx(mean, abs=1e-9)
    assert float(line["ci95_low"]) == pytest.approx(mean - half, abs=1e-6)
    group = metric.removeprefix("last_").split("_")[0]
    words = (f"{group}-shot top-1 after the last state" if metric.startswith("last_") else
             f"mean incremental {group}-shot top-1 excluding state 1")
    assert words in (tmp_path / "p" / "table.md").read_text()


def test_a_shot_metric_on_balanced_runs_is_one_error_line(runs, tmp_path, capsys):
    code = main(["compare", str(runs / "flat" / "finetune"), str(runs / "flat" / "icarl"), "--out",
                 str(tmp_path / "x"), "--baseline", "finetune", "--metric", "few_shot_top1"])
    err = capsys.readouterr().err
    assert code == 2 and "--metric 'few_shot_top1'" in err and err.strip().count("\n") == 0
