"""The validation protocol and ``cilkit tune`` (issue 11): held-out images scored after every
state, never trained on or stored; a grid ranked on them, never on the test set."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import tiny_config

from cilkit.runs import tune as tune_module
from cilkit.cli import main
from cilkit.data import load_dataset
from cilkit.data.base import Dataset, TensorImages
from cilkit.settings.registry import register_source
from cilkit.run.loop import Run
from cilkit.runs.tune import grid_points, parse_grid


@register_source("digits_test_labels_permuted", "test only: digits with the test labels shuffled")
def _permuted(cfg) -> Dataset:
    ds = load_dataset(cfg.model_copy(update={"name": "digits"}))
    test = ds.test
    assert isinstance(test, TensorImages)
    perm = torch.randperm(test.labels.numel(), generator=torch.Generator().manual_seed(5))
    ds.test = TensorImages(test.images, test.labels[perm])
    ds.name = "digits_test_labels_permuted"
    return ds


def test_validation_images_are_scored_each_state_and_never_trained_on_or_stored(tmp_path, monkeypatch):
    run = Run(tiny_config(tmp_path, "scenario.val_per_class=5", "state0_cache=null"), tmp_path / "r", progress=False)
    val_all = set(run.scenario.val_indices(10).tolist())
    assert len(val_all) == 50  # 5 of each of the 10 classes
    trained: set[int] = set()
    real_fit = run.engine.fit

    def recording_fit(ctx, hooks, indices, *args, **kwargs):
        trained.update(indices.tolist())
        return real_fit(ctx, hooks, indices, *args, **kwargs)

    monkeypatch.setattr(run.engine, "fit", recording_fit)
    res = run.execute()
    assert trained and not trained & val_all
    assert not set(run.memory.indices(range(10)).tolist()) & val_all
    for s in res["states"]:
        assert 0.0 <= s["val_top1"] <= 100.0
    assert res["mean_incremental_val_top1_excl_first"] == pytest.approx(
        sum(s["val_top1"] for s in res["states"][1:]) / 2)


def test_runs_without_a_hold_out_have_no_validation_keys(tmp_path):
    res = Run(tiny_config(tmp_path, "scenario.states=2"), tmp_path / "r", progress=False).execute()
    assert "val_top1" not in res["states"][0] and "mean_incremental_val_top1" not in res


def test_grid_parsing_keeps_bracketed_lists_whole():
    grid = parse_grid(["train.lr=0.1,0.01", "train.schedule.milestones=[1,2],[3,4]"])
    assert grid == {"train.lr": ["0.1", "0.01"], "train.schedule.milestones": ["[1,2]", "[3,4]"]}
    assert len(grid_points(grid)) == 4


def _tune(tmp_path, data_name: str, out: str, capsys) -> dict:
    cfg = tiny_config(tmp_path, "scenario.val_per_class=5", "scenario.states=2", "train.epochs=1", "threads=1",
                      f"data.name={data_name}")
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["tune", str(path), "--grid", "train.lr=0.001,0.2", "--out", str(tmp_path / out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / out / "ranking.json").read_text())
    assert "chosen on validation" in printed and record["set_line"] in printed
    return record


def test_tune_ranks_on_validation_and_the_test_labels_do_not_matter(tmp_path, capsys):
    real = _tune(tmp_path, "digits", "real", capsys)
    permuted = _tune(tmp_path, "digits_test_labels_permuted", "permuted", capsys)
    assert [r["values"] for r in real["ranking"]] == [r["values"] for r in permuted["ranking"]]
    assert [r["val_scores"] for r in real["ranking"]] == [r["val_scores"] for r in permuted["ranking"]]
    means = [r["val_score_mean"] for r in real["ranking"]]
    assert means == sorted(means, reverse=True) and real["chosen"] == real["ranking"][0]["values"]
    # the test top-1 did change with the permuted labels: the test set was read, just not used
    test_real = json.loads((tmp_path / "real" / "01-train.lr=0.2" / "results.json").read_text())
    test_perm = json.loads((tmp_path / "permuted" / "01-train.lr=0.2" / "results.json").read_text())
    assert test_real["states"][-1]["top1"] != test_perm["states"][-1]["top1"]


def test_tune_needs_a_hold_out_and_one_method(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path).to_dict()))
    assert main(["tune", str(path), "--grid", "train.lr=0.1,0.2", "--out", str(tmp_path / "t")]) == 2
    assert "scenario.val_per_class' must be >= 1" in capsys.readouterr().err
    assert main(["tune", str(path), "--grid", "train.lr", "--out", str(tmp_path / "t")]) == 2
    assert "expected KEY=V1,V2" in capsys.readouterr().err


LOADS: list[str] = []


@register_source("digits_counted", "test only: digits, counting how often it is read")
def _counted(cfg) -> Dataset:
    LOADS.append(cfg.name)
    ds = load_dataset(cfg.model_copy(update={"name": "digits"}))
    ds.name = "digits_counted"
    return ds


def test_tune_reads_the_data_once_and_reuses_a_point_only_of_the_same_config(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "scenario.val_per_class=5", "scenario.states=2", "train.epochs=1", "threads=1",
                      "data.name=digits_counted")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    args = ["tune", str(path), "--grid", "train.lr=0.001,0.2", "--out", str(tmp_path / "t")]
    LOADS.clear()
    assert main(args) == 0
    assert LOADS == ["digits_counted"]  # once for both points
    first = capsys.readouterr().out
    results = {p: p.read_bytes() for p in (tmp_path / "t").glob("*/results.json")}
    assert len(results) == 2
    assert main(args + ["--set", "threads=2"]) == 0  # the same config (threads shape no number): reused
    assert {p: p.read_bytes() for p in (tmp_path / "t").glob("*/results.json")} == results
    assert capsys.readouterr().out.splitlines()[-3:] == first.splitlines()[-3:]
    assert main(args + ["--set", "train.epochs=2", "--set", "train.batch_size=32"]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 't' / '00-train.lr=0.001'}' holds a run of another config" in err
    assert "differs in train.batch_size, train.epochs" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in (tmp_path / "t").glob("*/results.json")} == results


def _fake_points(monkeypatch, scores: dict[str, float | None]) -> None:
    """Points whose runs are not made: each reports the given validation score (by lr)."""
    def run_points(configs, dirs, execution, parent, datasets=None):
        return [[{"states": [{}, {}], "mean_incremental_val_top1_excl_first": scores[str(c.train.lr)]}] for c in configs]

    monkeypatch.setattr(tune_module, "run_points", run_points)
    monkeypatch.setattr(tune_module, "point_datasets", lambda configs: [None] * len(configs), raising=False)


def test_points_without_a_score_rank_last(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, "scenario.val_per_class=5").to_dict()))
    _fake_points(monkeypatch, {"0.1": 40.0, "0.2": None, "0.3": 55.0})
    assert main(["tune", str(path), "--grid", "train.lr=0.1,0.2,0.3", "--out", str(tmp_path / "t")]) == 0
    record = json.loads((tmp_path / "t" / "ranking.json").read_text())
    assert [r["values"]["train.lr"] for r in record["ranking"]] == ["0.3", "0.1", "0.2"]
    assert record["set_line"] == "--set train.lr=0.3"
    assert "--set train.lr=0.3" in capsys.readouterr().out

    _fake_points(monkeypatch, {"0.1": None, "0.2": None})
    assert main(["tune", str(path), "--grid", "train.lr=0.1,0.2", "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert "no grid point has a score (mean incremental validation top-1" in err and err.count("\n") == 1
    assert not (tmp_path / "u" / "ranking.json").exists()
