"""IL2M and class prediction scaling: the rectifier formulas, the class statistics every run
saves, a live ``il2m`` run against ``cilkit calibrate`` of the matching finetune run, errors."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from helpers import strip_timings, tiny_config

from cilkit.analysis.calibrate import calibrate_run
from cilkit.cil.rectify import il2m_rectify, prediction_scaling
from cilkit.cli import main
from cilkit.cil.metrics import run_summary
from cilkit.analysis.report import compare_runs
from cilkit.run.loop import Run
from cilkit.runs.multirun import run_methods

STATE_KEYS = ("top1", "top5", "top1_old", "top1_new", "balanced_top1", "new_class_share")
SUMMARY_KEYS = (
    "mean_incremental_top1",
    "mean_incremental_top1_excl_first",
    "mean_incremental_top5",
    "mean_incremental_top5_excl_first",
    "average_forgetting",
)


def load(path):
    return json.loads(path.read_text())


def assert_same_accuracies(a, b):
    for sa, sb in zip(a["states"], b["states"], strict=True):
        assert {k: sa[k] for k in STATE_KEYS} == {k: sb[k] for k in STATE_KEYS}
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert {k: a[k] for k in SUMMARY_KEYS} == {k: b[k] for k in SUMMARY_KEYS}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """finetune and il2m on the same tiny protocol and seed (one comparison directory)."""
    d = tmp_path_factory.mktemp("pair")
    run_methods(tiny_config(d, "method=[finetune,il2m]"), d / "cmp", progress=False)
    return d / "cmp"


# ----- the rectifiers --------------------------------------------------------------------------
def test_il2m_rectifies_old_scores_only_where_the_top1_is_new():
    logits = torch.tensor([
        [1.0, 2.0, 5.0, 0.5],  # top-1 new -> old scores rectified
        [4.0, 1.0, 3.0, 0.0],  # top-1 old -> unchanged
        [-1.0, 0.5, 0.2, 3.0],  # top-1 new -> old scores rectified
    ])
    init_mean, cur_mean = [2.0, 3.0], [1.0, 4.0]
    conf_now, conf_old = 6.0, [2.0, 3.0]  # conf[b], conf[s(o)]
    out = il2m_rectify(logits, 2, init_mean, cur_mean, conf_now, conf_old)
    factors = torch.tensor([2.0 / 1.0 * 6.0 / 2.0, 3.0 / 4.0 * 6.0 / 3.0])  # 6 and 1.5
    expected = logits.clone()
    expected[[0, 2], :2] *= factors
    assert torch.equal(out, expected)
    assert torch.equal(out[:, 2:], logits[:, 2:])  # new-class scores never change
    assert out[0].argmax() == 0  # the boosted old class now wins row 0


def test_il2m_leaves_a_class_without_statistics_unchanged():
    logits = torch.tensor([[1.0, 2.0, 5.0]])
    out = il2m_rectify(logits, 2, [2.0, 3.0], [1.0, None], 4.0, [2.0, 2.0])
    assert out.tolist() == [[4.0, 2.0, 5.0]]
    assert torch.equal(il2m_rectify(logits, 0, [], [], 4.0, []), logits)  # state 0: nothing old


def test_prediction_scaling_multiplies_probabilities_by_N_over_n():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0], [2.0, 2.1, -9.0]])
    out = prediction_scaling(logits, [10, 30, 0])
    expected = torch.softmax(logits, dim=1) * torch.tensor([40 / 10, 40 / 30, 1.0])  # n_j = 0: as is
    assert torch.allclose(out, expected, rtol=1e-6)
    assert out[2].argmax() == 0  # the rarer class overtakes a slightly higher logit


# ----- the statistics --------------------------------------------------------------------------
def test_statistics_are_the_class_means_of_the_state_model(tmp_path, pair):
    cfg = tiny_config(tmp_path, f"state0_cache={pair.parent / 'cache'}")  # reuses pair's state 0
    run = Run(cfg, tmp_path / "run", progress=False)
    run.execute(until_state=1)  # run.model is now the model of state 1
    stats0 = load(tmp_path / "run" / "stats" / "state_00.json")
    stats = load(tmp_path / "run" / "stats" / "state_01.json")
    sc, st = run.scenario, run.scenario.state(1)

    def logits_of(idx):
        """The state model's logits, computed here without the engine: pixels / 255, normalised
        by the run's mean and std, one forward in eval mode."""
        x = run.dataset.train.images[idx].double() / 255.0
        x = (x - run.mean.double().view(1, -1, 1, 1)) / run.std.double().view(1, -1, 1, 1)
        with torch.no_grad():
            return run.model.eval()(x.float())["logits"].double()

    z, pos = logits_of(st.train), sc.train_pos[st.train]
    for c in st.new:
        assert stats["init_mean"][str(c)] == pytest.approx(z[pos == c, c].mean().item(), rel=1e-5)
        assert stats["train_counts"][str(c)] == int((pos == c).sum())
    assert stats["conf"][1] == pytest.approx(z.max(dim=1).values.mean().item(), rel=1e-5)
    # statistics of the state-0 classes are carried from state 0, not recomputed
    assert stats["conf"][0] == stats0["conf"][0]
    assert {str(c): stats["init_mean"][str(c)] for c in range(4)} == stats0["init_mean"]
    # old classes: their exemplars as trained on in state 1, i.e. the memory saved after state 0
    exemplars = load(tmp_path / "run" / "memory" / "state_00.json")["exemplars"]
    assert len(exemplars) == 4 == len(stats["cur_mean"])
    for original, ids in exemplars.items():
        o = int(sc.position_of[int(original)])
        expected = logits_of(torch.tensor(ids))[:, o].mean().item()
        assert stats["cur_mean"][str(o)] == pytest.approx(expected, rel=1e-5)
        assert stats["train_counts"][str(o)] == len(ids) == stats["cur_mean_images"][str(o)]
    assert stats["train_total"] == sum(stats["train_counts"].values()) == run.results["states"][1]["train_images"]


def test_resumed_il2m_run_reproduces_statistics_and_results(tmp_path, pair):
    cfg = tiny_config(tmp_path, "method=il2m", f"state0_cache={pair.parent / 'cache'}")
    Run(cfg, tmp_path / "cut", progress=False).execute(until_state=0)  # "killed" after state 1
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0
    for b in range(3):
        name = f"state_{b:02d}.json"
        assert load(tmp_path / "cut" / "stats" / name) == load(pair / "il2m" / "stats" / name)
    assert strip_timings(load(tmp_path / "cut" / "results.json")) == strip_timings(load(pair / "il2m" / "results.json"))


# ----- live il2m and cilkit calibrate ----------------------------------------------------------
def test_live_il2m_equals_calibrated_finetune(pair):
    assert main(["calibrate", str(pair), "--with", "il2m"]) == 0  # a parent: each method calibrated
    ft, live = load(pair / "finetune" / "results.json"), load(pair / "il2m" / "results.json")
    calibrated = load(pair / "finetune" / "calibrated" / "il2m" / "results.json")
    assert (pair / "il2m" / "calibrated" / "il2m" / "results.json").is_file()
    assert live["primary_scores"] == calibrated["primary_scores"] == "il2m"
    assert_same_accuracies(live, calibrated)
    changed = False
    for b, (s_live, s_cal, s_ft) in enumerate(zip(live["states"], calibrated["states"], ft["states"])):
        assert s_live["variants"]["cnn"] == s_cal["variants"]["cnn"]  # the raw scores: finetune's
        assert s_live["variants"]["cnn"]["top1"] == s_ft["top1"]
        a = np.load(pair / "il2m" / "scores" / f"state_{b:02d}.npz")
        c = np.load(pair / "finetune" / "calibrated" / "il2m" / "scores" / f"state_{b:02d}.npz")
        assert np.array_equal(a["scores"], c["scores"])
        changed |= not np.array_equal(a["scores"], a["logits"])
    assert changed, "IL2M rectified no score at all"


def test_calibrate_none_and_scaling_need_no_model(pair, tmp_path):
    src = tmp_path / "ft"
    shutil.copytree(pair / "finetune", src, ignore=shutil.ignore_patterns("checkpoints", "calibrated"))
    res = calibrate_run(src, "none", tmp_path / "none", echo=False)[""]
    assert res == load(tmp_path / "none" / "results.json")
    assert_same_accuracies(res, load(src / "results.json"))

    res = calibrate_run(src, "scaling", None, echo=False)[""]
    assert res == load(src / "calibrated" / "scaling" / "results.json")
    for b, s in enumerate(res["states"]):
        npz = np.load(src / "scores" / f"state_{b:02d}.npz")
        counts = load(src / "stats" / f"state_{b:02d}.json")["train_counts"]
        n = np.array([counts[str(c)] for c in range(npz["logits"].shape[1])], dtype=float)
        p = np.exp(npz["logits"] - npz["logits"].max(1, keepdims=True))
        pred = (p / p.sum(1, keepdims=True) * n.sum() / n).argmax(1)
        assert s["top1"] == pytest.approx(100 * (pred == npz["labels"]).mean())


def test_calibrate_errors_exit_2_naming_the_fault(pair, tmp_path, capsys):
    assert main(["calibrate", str(pair / "finetune"), "--with", "bic"]) == 2
    assert "unknown rectifier 'bic'" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "nowhere"), "--with", "il2m"]) == 2
    assert "nowhere/results.json' not found" in capsys.readouterr().err

    src = tmp_path / "ft"
    shutil.copytree(pair / "finetune", src, ignore=shutil.ignore_patterns("checkpoints", "calibrated"))
    (src / "stats" / "state_01.json").unlink()
    assert main(["calibrate", str(src), "--with", "il2m"]) == 2
    assert "stats/state_01.json' not found" in capsys.readouterr().err
    assert not (src / "calibrated").exists(), "nothing written when an input is missing"
    (src / "scores" / "state_02.npz").write_bytes(b"not a zip")
    assert main(["calibrate", str(src), "--with", "none"]) == 2
    assert "scores/state_02.npz' cannot be read" in capsys.readouterr().err


def test_calibrate_prints_before_and_after_and_never_rectifies_its_own_output(pair, tmp_path, capsys):
    src = tmp_path / "cmp"
    shutil.copytree(pair, src, ignore=shutil.ignore_patterns("checkpoints", "calibrated"))
    assert main(["calibrate", str(src / "finetune"), "--with", "il2m"]) == 0
    before = load(src / "finetune" / "results.json")["mean_incremental_top1_excl_first"]
    after = load(src / "finetune" / "calibrated" / "il2m" / "results.json")["mean_incremental_top1_excl_first"]
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"finetune -> finetune+il2m: mean incremental top-1 (excl. state 1) {before:.2f} -> "
                           f"{after:.2f}")
    # an output beside the methods, where the parent's calibration finds it
    assert main(["calibrate", str(src / "finetune"), "--with", "il2m", "--out", str(src / "ft_il2m")]) == 0
    capsys.readouterr()
    # the parent again: finetune and il2m are rectified, the earlier output is skipped, and said so
    assert main(["calibrate", str(src), "--with", "il2m"]) == 0
    out = capsys.readouterr().out
    assert "+il2m+il2m" not in out and out.count(" -> ") == 4  # two lines, two arrows each
    assert f"{src / 'ft_il2m'}: skipped, already the output of cilkit calibrate (finetune+il2m)" in out
    assert not (src / "ft_il2m" / "calibrated").exists()
    assert load(src / "ft_il2m" / "results.json")["method"] == "finetune+il2m"
    assert main(["calibrate", str(src / "finetune" / "calibrated" / "il2m"), "--with", "il2m"]) == 2
    assert "holds no uncalibrated run" in capsys.readouterr().err


def _repeated(pair, root):
    """A parent as ``runs: 2`` of finetune and il2m lays it out (copies of pair's runs, each
    with its results.json marked by the run it stands for)."""
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"method": ["finetune", "il2m"], "runs": 2}))
    for method in ("finetune", "il2m"):
        for k in range(2):
            d = root / method / f"run_{k}"
            shutil.copytree(pair / method, d, ignore=shutil.ignore_patterns("checkpoints", "calibrated"))
            res = load(d / "results.json")
            res["run_mark"] = f"{method}/run_{k}"
            (d / "results.json").write_text(json.dumps(res))
    return root


def test_calibrating_a_parent_of_repeated_runs_keeps_each_run_apart(pair, tmp_path, capsys):
    src = _repeated(pair, tmp_path / "rep")
    assert main(["calibrate", str(src), "--with", "il2m", "--out", str(tmp_path / "cal")]) == 0
    assert capsys.readouterr().out.count(" -> ") == 8  # four runs, four lines
    for method in ("finetune", "il2m"):
        for k in range(2):
            res = load(tmp_path / "cal" / method / f"run_{k}" / "results.json")
            assert res["run_mark"] == f"{method}/run_{k}" and res["method"] == f"{method}+il2m"
            assert res["calibration"]["source"] == str((src / method / f"run_{k}").resolve())
    assert sorted(p.parent.relative_to(tmp_path / "cal").as_posix()
                  for p in (tmp_path / "cal").rglob("results.json")) == [
        "finetune/run_0", "finetune/run_1", "il2m/run_0", "il2m/run_1"]


def test_calibrate_refuses_to_write_onto_a_source_run_or_twice_to_one_place(pair, tmp_path, capsys):
    src = _repeated(pair, tmp_path / "rep")
    before = {p: p.read_bytes() for p in src.rglob("results.json")}
    assert main(["calibrate", str(src), "--with", "il2m", "--out", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"would overwrite the run '{src / 'finetune' / 'run_0'}'" in err and err.count("\n") == 1
    run = src / "il2m" / "run_1"
    assert main(["calibrate", str(run), "--with", "none", "--out", str(run)]) == 2
    assert f"would overwrite the run '{run}'" in capsys.readouterr().err
    # two runs sent to one place (the destination's il2m is a link to its finetune)
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "finetune").mkdir()
    (tmp_path / "cal" / "il2m").symlink_to(tmp_path / "cal" / "finetune")
    assert main(["calibrate", str(src), "--with", "il2m", "--out", str(tmp_path / "cal")]) == 2
    err = capsys.readouterr().err
    assert (f"the calibrations of '{src / 'finetune' / 'run_0'}' and '{src / 'il2m' / 'run_0'}' would both go to "
            f"'{tmp_path / 'cal' / 'il2m' / 'run_0'}'") in err and err.count("\n") == 1
    assert not list((tmp_path / "cal").rglob("results.json"))
    assert before == {p: p.read_bytes() for p in src.rglob("results.json")}, "nothing written"


def test_calibrated_results_carry_no_figure_of_their_source(pair, tmp_path):
    src = tmp_path / "ft"
    shutil.copytree(pair / "finetune", src, ignore=shutil.ignore_patterns("checkpoints", "calibrated"))
    source = load(src / "results.json")
    for s in source["states"]:  # as a run with a validation hold-out records it
        s["val_top1"] = 12.5
    source.update(mean_incremental_val_top1=12.5, mean_incremental_val_top1_excl_first=12.5,
                  mean_incremental_made_up=1.0, average_forgetting=99.0)
    (src / "results.json").write_text(json.dumps(source))
    res = calibrate_run(src, "il2m", tmp_path / "out", echo=False)[""]
    assert res == load(tmp_path / "out" / "results.json")
    assert not [k for k in res if k.startswith("mean_incremental_val") or k == "mean_incremental_made_up"]
    assert "wall_time_s" not in res and "provenance" not in res
    assert res["calibration"]["source_provenance"] == source["provenance"]
    summary = run_summary(res["states"], res["accuracy_matrix"])
    assert {k: v for k, v in res.items() if k.startswith("mean_incremental_") or k == "average_forgetting"} == summary
    assert res["average_forgetting"] != 99.0
    # the report shows no time and no provenance of the source as the calibrated run's own
    compare_runs([tmp_path / "out"], tmp_path / "report", echo=False)
    lines = (tmp_path / "report" / "table.md").read_text().splitlines()
    titles, row = lines[2], lines[4]  # after the protocol header and a blank
    cells = dict(zip((t.strip() for t in titles.split("|")), (c.strip() for c in row.split("|"))))
    assert row.startswith("| finetune+il2m |") and cells["time (s)"] == "-"
    # ^ the model and memory sizes after it (issue 39 item 5) are the source's: the same model and exemplars
    assert source["provenance"]["started"] not in (tmp_path / "report" / "report.html").read_text()


def test_the_source_config_is_found_from_any_working_directory(pair, tmp_path, monkeypatch):
    shutil.copytree(pair / "finetune", tmp_path / "ft", ignore=shutil.ignore_patterns("checkpoints", "calibrated"))
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "ft", "--with", "il2m"]) == 0
    out = tmp_path / "ft" / "calibrated" / "il2m"
    assert load(out / "results.json")["calibration"]["source"] == str((tmp_path / "ft").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    def table():
        compare_runs([tmp_path / "ft", out], tmp_path / "report", echo=False)
        return (tmp_path / "report" / "table.md").read_text()

    assert "Protocol" not in table()  # one protocol: the calibrated run's config is its source's
    res = load(out / "results.json")
    res["calibration"]["source"] = "ft"  # as an older cilkit wrote it: relative to where calibrate ran
    (out / "results.json").write_text(json.dumps(res))
    assert "Protocol" not in table()


def test_calibrate_never_overwrites_other_results_but_repeats_its_own(pair, tmp_path, capsys):
    src, other = tmp_path / "ft", tmp_path / "il2m"
    for method, d in (("finetune", src), ("il2m", other)):
        shutil.copytree(pair / method, d, ignore=shutil.ignore_patterns("checkpoints", "calibrated"))
    before = (other / "results.json").read_bytes()
    assert main(["calibrate", str(src), "--with", "il2m", "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"'{other}' already holds results" in err and err.count("\n") == 1
    assert (other / "results.json").read_bytes() == before
    out = tmp_path / "cal"
    assert main(["calibrate", str(src), "--with", "il2m", "--out", str(out)]) == 0
    first = load(out / "results.json")
    assert main(["calibrate", str(src), "--with", "il2m", "--out", str(out)]) == 0  # the same calibration again
    assert strip_timings(load(out / "results.json")) == strip_timings(first)
    assert main(["calibrate", str(src), "--with", "scaling", "--out", str(out)]) == 2  # another one
    assert "not the scaling calibration" in capsys.readouterr().err
    assert load(out / "results.json")["calibration"]["rectifier"] == "il2m"
