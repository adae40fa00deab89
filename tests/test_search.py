"""cilkit tune beyond grids and its options (issues 24 and 26): Optuna's TPE and random search
in a journal study that --jobs shares and an interrupted tune continues; --jobs on a grid;
the "tie" verdict; epochs 0 refused; --plugin; --metric balanced_top1."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from helpers import tiny_config

from cilkit.cli import main
from cilkit.runs import search as search_module
from cilkit.runs import tune as tune_module
from cilkit.runs.tune import validation_score

pytest.importorskip("optuna")


def _config_file(tmp_path, *overrides: str) -> str:
    cfg = tiny_config(tmp_path, "scenario.val_per_class=5", "scenario.states=2", "train.epochs=1", "threads=1",
                      *overrides)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def _val_score(results_path) -> float:
    """Mean incremental validation top-1 without the first state, from results.json by hand."""
    states = json.loads(results_path.read_text())["states"]
    return statistics.fmean(s["val_top1"] for s in states[1:])


def _trial_bytes(out) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in out.glob("trial-*/results.json")}


@pytest.mark.slow
def test_tpe_with_two_jobs_ranks_on_validation_and_continues_after_an_interruption(tmp_path, monkeypatch, capsys):
    config = _config_file(tmp_path)
    out = tmp_path / "t"
    args = ["tune", config, "--search", "tpe", "--trials", "6", "--jobs", "2", "--range", "train.lr=0.001:0.3:log",
            "--grid", "train.batch_size=32,64", "--out", str(out)]
    real_run_points = search_module.run_points
    batches: list[int] = []

    def interrupted_second_batch(configs, dirs, *rest):
        batches.append(len(configs))
        results = real_run_points(configs, dirs, *rest)
        if len(batches) == 2:  # its runs finished, the study not yet told: as a Ctrl-C would leave it
            raise KeyboardInterrupt
        return results

    monkeypatch.setattr(search_module, "run_points", interrupted_second_batch)
    assert main(args) == 130  # "interrupted"
    assert batches == [2, 2]
    before = _trial_bytes(out)
    assert sorted(before) == ["trial-000", "trial-001", "trial-002", "trial-003"]

    monkeypatch.setattr(search_module, "run_points", real_run_points)
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "continuing 2 trial(s) of an interrupted tune" in printed
    after = _trial_bytes(out)
    assert sorted(after) == [f"trial-{k:03d}" for k in range(6)]
    assert {k: after[k] for k in before} == before  # the four trials run before were read back, not rerun
    record = json.loads((out / "ranking.json").read_text())
    assert len(record["ranking"]) == 6 and record["search"] == "tpe"
    for row in record["ranking"]:  # each trial scored on its validation images
        assert row["val_score_mean"] == pytest.approx(_val_score(tmp_path / row["dir"] / "results.json"))
        lr = float(row["values"]["train.lr"])
        assert 0.001 <= lr <= 0.3 and row["values"]["train.batch_size"] in ("32", "64")
        stored = yaml.safe_load((tmp_path / row["dir"] / "config.yaml").read_text())
        assert stored["train"]["lr"] == pytest.approx(lr) and stored["train"]["batch_size"] == int(row["values"]["train.batch_size"])
    means = [r["val_score_mean"] for r in record["ranking"]]
    assert means == sorted(means, reverse=True)
    assert record["set_line"] in printed and (out / "study.journal").is_file()


@pytest.mark.slow
def test_a_grid_under_two_jobs_scores_exactly_as_the_serial_grid(tmp_path, capsys):
    config = _config_file(tmp_path)
    grid = ["--grid", "train.lr=0.01,0.2"]
    assert main(["tune", config, *grid, "--out", str(tmp_path / "serial")]) == 0
    assert main(["tune", config, *grid, "--jobs", "2", "--out", str(tmp_path / "jobs")]) == 0
    serial = json.loads((tmp_path / "serial" / "ranking.json").read_text())
    parallel = json.loads((tmp_path / "jobs" / "ranking.json").read_text())
    assert [(r["values"], r["val_scores"]) for r in serial["ranking"]] == \
           [(r["values"], r["val_scores"]) for r in parallel["ranking"]]


def _fake_seeds(monkeypatch, scores: dict[str, list[float]]) -> None:
    """Points whose runs are not made: each seed reports the given validation score (by lr)."""
    def run_points(configs, dirs, execution, parent, datasets=None):
        return [[{"states": [{}, {}], "mean_incremental_val_top1_excl_first": v} for v in scores[str(c.train.lr)]]
                for c in configs]

    monkeypatch.setattr(tune_module, "run_points", run_points)
    monkeypatch.setattr(tune_module, "point_datasets", lambda configs: [None] * len(configs))


def test_points_within_their_seed_noise_are_a_tie(tmp_path, monkeypatch, capsys):
    config = _config_file(tmp_path, "runs=2")
    # 52.0 ± 2.83 vs 51.5 ± 0.71: a difference of 0.5 inside the noise
    _fake_seeds(monkeypatch, {"0.1": [50.0, 54.0], "0.2": [51.0, 52.0]})
    assert main(["tune", config, "--grid", "train.lr=0.1,0.2", "--out", str(tmp_path / "tie")]) == 0
    printed = capsys.readouterr().out
    assert "tie on validation" in printed and "chosen on validation" not in printed
    assert "52.00 ± 2.83 vs 51.50 ± 0.71" in printed
    assert json.loads((tmp_path / "tie" / "ranking.json").read_text())["verdict"] == "tie"
    _fake_seeds(monkeypatch, {"0.1": [50.0, 51.0], "0.2": [60.0, 61.0]})
    assert main(["tune", config, "--grid", "train.lr=0.1,0.2", "--out", str(tmp_path / "clear")]) == 0
    printed = capsys.readouterr().out
    assert "chosen on validation" in printed and "--set train.lr=0.2" in printed and "tie" not in printed


@pytest.mark.parametrize("key", ["train.epochs", "train.epochs_first"])
def test_tune_refuses_points_that_train_nothing(tmp_path, capsys, key):
    config = _config_file(tmp_path)
    assert main(["tune", config, "--grid", "train.lr=0.1,0.2", "--set", f"{key}=0", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1
    assert main(["tune", config, "--grid", f"{key}=0,1", "--out", str(tmp_path / "u")]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()


PLUGIN = '''
from cilkit.methods.finetune import Finetune
from cilkit.settings.registry import register_method


@register_method("tune_plugin_finetune")
class TunePluginFinetune(Finetune):
    description = "fine-tuning under another name (test plugin of cilkit tune --plugin)"
'''


def test_tune_imports_a_plugin_method(tmp_path, monkeypatch, capsys):
    plugin = tmp_path / "mine.py"
    plugin.write_text(PLUGIN)
    config = _config_file(tmp_path)
    _fake_seeds(monkeypatch, {"0.1": [40.0], "0.2": [45.0]})
    args = ["tune", config, "--grid", "train.lr=0.1,0.2", "--set", "method=tune_plugin_finetune"]
    assert main(args + ["--out", str(tmp_path / "without")]) == 2
    assert "tune_plugin_finetune" in capsys.readouterr().err
    assert main(args + ["--plugin", str(plugin), "--out", str(tmp_path / "with")]) == 0
    assert "--set train.lr=0.2" in capsys.readouterr().out


def test_balanced_validation_score_is_the_mean_over_states_after_the_first():
    results = {"states": [{"val_balanced_top1": 90.0, "val_top1": 95.0},
                          {"val_balanced_top1": 40.0, "val_top1": 70.0},
                          {"val_balanced_top1": 60.0, "val_top1": 80.0}],
               "mean_incremental_val_top1_excl_first": 75.0}
    assert validation_score(results, "balanced_top1") == pytest.approx(50.0)  # (40 + 60) / 2
    assert validation_score(results, "top1") == pytest.approx(75.0)
    assert validation_score({"states": [{"val_balanced_top1": 33.0}]}, "balanced_top1") == pytest.approx(33.0)


def test_tune_ranks_by_balanced_top1_when_asked(tmp_path, capsys):
    """A long-tailed hold-out: the ranking's scores are the balanced ones of each point's results."""
    config = _config_file(tmp_path, "scenario.imbalance.profile=longtail", "scenario.imbalance.ratio=5",
                          "scenario.imbalance.apply_to_test=true")
    out = tmp_path / "t"
    assert main(["tune", config, "--grid", "train.lr=0.01,0.2", "--metric", "balanced_top1", "--out", str(out)]) == 0
    record = json.loads((out / "ranking.json").read_text())
    assert "balanced" in record["metric"] and "val. balanced top-1" in (out / "ranking.md").read_text()
    for row in record["ranking"]:
        states = json.loads((tmp_path / row["dir"] / "results.json").read_text())["states"]
        assert row["val_score_mean"] == pytest.approx(statistics.fmean(s["val_balanced_top1"] for s in states[1:]))
    with pytest.raises(SystemExit) as refused:  # argparse's one line, status 2
        main(["tune", config, "--grid", "train.lr=0.01,0.2", "--metric", "top5", "--out", str(tmp_path / "x")])
    assert refused.value.code == 2 and "invalid choice: 'top5'" in capsys.readouterr().err


def test_tune_without_a_config_tunes_the_quickstart(tmp_path, monkeypatch, capsys):
    """Issue 40 item 6: as ``cilkit run``, ``cilkit tune`` without a config takes the embedded
    quickstart (into runs/tune-quickstart)."""
    from cilkit.settings.config import load_config

    monkeypatch.chdir(tmp_path)
    _fake_seeds(monkeypatch, {"0.1": [40.0, 41.0], "0.2": [50.0, 51.0]})
    seen = []
    fake = tune_module.run_points
    monkeypatch.setattr(tune_module, "run_points", lambda configs, *rest: seen.extend(configs) or fake(configs, *rest))
    sets = ["method=finetune", "scenario.val_per_class=5", "runs=2"]
    assert main(["tune", *[a for s in sets for a in ("--set", s)], "--grid", "train.lr=0.1,0.2"]) == 0
    assert "chosen on validation" in capsys.readouterr().out
    record = json.loads((tmp_path / "runs" / "tune-quickstart" / "ranking.json").read_text())
    assert record["config"] == "quickstart" and record["chosen"] == {"train.lr": "0.2"}
    assert [c.to_dict() for c in seen] == [load_config(None, [*sets, f"train.lr={lr}"]).to_dict() for lr in ("0.1", "0.2")]


CAVEAT = "single seed, no noise estimate"


def test_a_one_seed_grid_choice_carries_the_single_seed_caveat(tmp_path, monkeypatch, capsys):
    """Issue 40 item 7: one seed per point gives no noise to hold a difference against: the
    choice is printed and recorded with the caveat; with seeds enough to separate them, none."""
    config = _config_file(tmp_path)
    _fake_seeds(monkeypatch, {"0.1": [50.0], "0.2": [50.34]})
    assert main(["tune", config, "--grid", "train.lr=0.1,0.2", "--out", str(tmp_path / "one")]) == 0
    printed = capsys.readouterr().out
    assert "chosen on validation" in printed and "--set train.lr=0.2" in printed
    assert f"caveat: {CAVEAT}: the first two differ by 0.34 points" in printed
    record = json.loads((tmp_path / "one" / "ranking.json").read_text())
    assert record["verdict"] == "chosen" and record["caveat"].startswith(CAVEAT)
    assert CAVEAT in (tmp_path / "one" / "ranking.md").read_text()
    config = _config_file(tmp_path, "runs=2")
    _fake_seeds(monkeypatch, {"0.1": [50.0, 51.0], "0.2": [60.0, 61.0]})
    assert main(["tune", config, "--grid", "train.lr=0.1,0.2", "--out", str(tmp_path / "two")]) == 0
    assert CAVEAT not in capsys.readouterr().out
    assert json.loads((tmp_path / "two" / "ranking.json").read_text())["caveat"] is None


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_one_seed_search_choice_carries_the_same_caveat(tmp_path, monkeypatch, capsys, sampler):
    """Issue 40 item 7: ``--search tpe|random`` says what the grid says of one seed."""
    config = _config_file(tmp_path)
    scores = {"trial-000": 50.0, "trial-001": 50.34}

    def results(run_dir):
        return {"states": [{}, {}], "mean_incremental_val_top1_excl_first": scores[run_dir.name]}

    monkeypatch.setattr(search_module, "run_points", lambda configs, dirs, *rest: [[results(d)] for d in dirs])
    monkeypatch.setattr(search_module, "point_datasets", lambda configs: [None] * len(configs))
    monkeypatch.setattr(search_module, "_trial_results", lambda run_dir, base: [results(run_dir)])
    out = tmp_path / sampler
    assert main(["tune", config, "--search", sampler, "--trials", "2", "--range", "train.lr=0.01:0.3:log",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chosen on validation" in printed and f"caveat: {CAVEAT}: the first two differ by 0.34 points" in printed
    record = json.loads((out / "ranking.json").read_text())
    assert record["search"] == sampler and record["caveat"].startswith(CAVEAT)
