"""compare, tune and calibrate own what they write and read only sound run files: an --out that
holds a run or the user's files is refused, a damaged results.json, statistics or scores file is
one line naming the file and the field, never a traceback or a wrong table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from helpers import one_error_line, snapshot, tiny_config

from cilkit.analysis.report import compare_runs
from cilkit.cli import main
from cilkit.runs import tune as tune_module
from cilkit.run.loop import Run

MARKER = ".cilkit-compare"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-state finetune run (1 epoch, one thread)."""
    base = tmp_path_factory.mktemp("analysis")
    Run(tiny_config(base, "train.epochs=1", "threads=1"), base / "run", progress=False).execute()
    return base / "run"


def copy_run(finished: Path, dest: Path) -> Path:
    shutil.copytree(finished, dest, ignore=shutil.ignore_patterns("checkpoints", "report", "calibrated"))
    return dest




def edit_json(path: Path, change: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ----- item 1: compare writes only into a directory it owns --------------------------------------
def test_compare_refuses_an_out_holding_the_users_files(finished, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table.md").write_text("my own notes\n")
    (mine / "report.html").write_text("<p>my page</p>\n")
    before = snapshot(mine)
    assert main(["compare", str(finished), "--out", str(mine)]) == 2
    line = one_error_line(capsys)
    assert f"'{mine}'" in line and "not a cilkit compare output" in line
    assert snapshot(mine) == before


@pytest.mark.slow
def test_compare_refuses_a_source_run_or_a_directory_holding_runs(finished, tmp_path, capsys):
    a, b = copy_run(finished, tmp_path / "a"), copy_run(finished, tmp_path / "b")
    before = snapshot(tmp_path)
    for out in (a, tmp_path, a / "scores" / "mine"):
        assert main(["compare", str(a), str(b), "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"--out '{out}'" in line and "cilkit run" in line, line
    assert snapshot(tmp_path) == before
    assert not (a / "scores" / "mine").exists()
    cfg = tmp_path / "cfg.yaml"  # the source run can still be replaced by `run --overwrite`
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, "train.epochs=1", "threads=1", "scenario.states=2").to_dict()))
    assert main(["run", str(cfg), "--out", str(a), "--overwrite"]) == 0


@pytest.mark.slow
def test_compare_marks_its_output_and_replaces_only_its_own(finished, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(finished), "--out", str(out)]) == 0
    assert (out / MARKER).is_file() and (out / "table.md").is_file()
    assert main(["compare", str(finished), "--out", str(out)]) == 0  # its own output again
    (out / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert main(["compare", str(finished), "--out", str(out)]) == 2
    assert "'notes.txt'" in one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine\n"


@pytest.mark.slow
def test_the_runs_own_report_directory_stays_writable(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    for _ in range(2):
        assert compare_runs([run], echo=False) == run / "report"
    assert not (run / "report" / MARKER).exists()  # the run's own: no compare marker in it
    assert {"table.md", "table.csv", "report.html"} <= {p.name for p in (run / "report").iterdir()}


# ----- item 2: tune writes only into a new directory or a tune of the same command ---------------
@pytest.fixture
def tune_config(tmp_path, monkeypatch) -> Path:
    """A tune config whose points are not trained (each scores by its lr)."""
    def run_points(configs, dirs, execution, parent, datasets=None):
        for run_dir in dirs:
            run_dir.mkdir(parents=True, exist_ok=True)
        return [[{"states": [{}, {}], "mean_incremental_val_top1_excl_first": float(c.train.lr)}] for c in configs]

    monkeypatch.setattr(tune_module, "run_points", run_points)
    monkeypatch.setattr(tune_module, "point_datasets", lambda configs: [None] * len(configs))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, "scenario.val_per_class=5").to_dict()))
    return path


def test_tune_refuses_an_out_holding_a_run_or_the_users_files(finished, tune_config, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    calibrated = tmp_path / "cal"
    assert main(["calibrate", str(run), "--with", "il2m", "--out", str(calibrated)]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "ranking.md").write_text("my ranking\n")
    capsys.readouterr()
    for out, said in ((run, "holds a cilkit run"), (calibrated, "holds a cilkit run"), (tmp_path, "cilkit run"),
                      (mine, "not a cilkit tune")):
        before = snapshot(out)
        assert main(["tune", str(tune_config), "--grid", "train.lr=0.1", "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"--out '{out}'" in line and said in line, line
        assert snapshot(out) == before


def test_tune_reuses_only_a_tune_of_the_same_command(tune_config, tmp_path, capsys):
    out = tmp_path / "t"
    args = ["tune", str(tune_config), "--grid", "train.lr=0.1,0.2", "--out", str(out)]
    assert main(args) == 0
    assert main(args + ["--set", "threads=2"]) == 0  # the same command: the points are checked one by one
    capsys.readouterr()
    assert main(["tune", str(tune_config), "--grid", "train.lr=0.3", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"--out '{out}'" in line and "another tune" in line
    assert not (out / "00-train.lr=0.3").exists()
    (out / "notes.txt").write_text("mine\n")
    assert main(args) == 2
    assert "'notes.txt'" in one_error_line(capsys)


# ----- item 3: results.json is checked on every read ----------------------------------------------
def _set(key: str, value: Any) -> Callable[[dict], None]:
    def change(results: dict) -> None:
        *parents, last = key.split(".")
        node: Any = results
        for k in parents:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(last) if last.isdigit() else last] = value
    return change


@pytest.mark.parametrize("key,value,message", [
    ("state_ends", [4, 7], "'state_ends' has 2 entries, not num_states (3)"),
    ("state_ends", [4, 10, 7], "'state_ends' is not a list of increasing positive integers"),
    ("state_ends", [4, "7", 10], "'state_ends' is not a list of increasing positive integers"),
    ("num_states", "3", "'num_states' is not a positive integer"),
    ("class_order", [4, "a", 7, 6, 0, 3, 5, 8, 9, 1], "'class_order' is not a list of integers"),
    ("states.2.top1", "abc", "'states[2].top1' is not a number"),
    ("states.1.top1_old", True, "'states[1].top1_old' is not a number"),
    ("states.1.state", 5, "'states[1].state' is not 1"),
    ("states.1.classes_seen", "7", "'states[1].classes_seen' is not 7"),
    ("states.0.new_classes", 4, "'states[0].new_classes' is not a list of integers"),
    ("states.1.variants", {"cnn": {"top1": "x"}}, "'states[1].variants.cnn.top1' is not a number"),
    ("accuracy_matrix.1", [1.0], "'accuracy_matrix[1]' is not a list of 2 numbers"),
    ("accuracy_matrix", [[1.0]], "'accuracy_matrix' has 1 rows, not one per state (3)"),
    ("mean_incremental_top1", "abc", "'mean_incremental_top1' is not a number"),
])
def test_compare_refuses_a_damaged_results_file_naming_the_field(finished, tmp_path, capsys, key, value, message):
    run = copy_run(finished, tmp_path / "run")
    edit_json(run / "results.json", _set(key, value))
    assert main(["compare", str(run), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"'{run / 'results.json'}' is damaged: {message}" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_sound_results_file_still_reads(finished, tmp_path, capsys):
    assert main(["compare", str(finished), "--out", str(tmp_path / "out")]) == 0
    assert "| finetune |" in capsys.readouterr().out


# ----- item 4: calibrate on damaged run files ----------------------------------------------------
def _stats(key: str, value: Any) -> Callable[[Path], Path]:
    def damage(run: Path) -> Path:
        edit_json(run / "stats" / "state_02.json", _set(key, value))
        return run / "stats" / "state_02.json"
    return damage


def _scores(name: str, cut: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    def damage(run: Path) -> Path:
        path = run / "scores" / "state_02.npz"
        with np.load(path) as npz:
            arrays = dict(npz)
        arrays[name] = cut(arrays[name])
        np.savez(path, **arrays)
        return path
    return damage


def _results(key: str, value: Any, drop: str | None = None) -> Callable[[Path], Path]:
    def damage(run: Path) -> Path:
        edit_json(run / "results.json", lambda r: (_set(key, value)(r), r.pop(drop, None) if drop else None))
        return run / "results.json"
    return damage


@pytest.mark.parametrize("rectifier,damage,message", [
    ("il2m", _stats("init_mean.0", "abc"), "'init_mean.0' is not a number"),
    ("il2m", _stats("conf", ["x", 1.0, 2.0]), "'conf[0]' is not a number"),
    ("il2m", _stats("cur_mean", [0.1]), "'cur_mean' is not an object"),
    ("il2m", _stats("state_ends", [4]), "'state_ends' is not [4, 7, 10]"),
    ("scaling", _stats("train_counts.3", "many"), "'train_counts.3' is not a number"),
    ("il2m", _scores("logits", lambda a: a[:, :5]), "'logits' has 5 columns, fewer than the 10 classes seen"),
    ("il2m", _scores("labels", lambda a: a[:10]), "'labels' has 10 entries for the "),
    ("il2m", _scores("labels", lambda a: a + 20), "'labels' has values outside the 10 classes seen"),
    ("il2m", _scores("logits", lambda a: a.astype(str)), "'logits' is not a numeric array"),
    ("il2m", _results("state_ends", [4], drop="num_states"), "'states' has 3 entries, more than 'state_ends' (1)"),
])
def test_calibrate_refuses_damaged_run_files_in_one_line(finished, tmp_path, capsys, rectifier, damage, message):
    run = copy_run(finished, tmp_path / "run")
    path = damage(run)
    assert main(["calibrate", str(run), "--with", rectifier, "--out", str(tmp_path / "cal")]) == 2
    line = one_error_line(capsys)
    assert f"'{path}' is damaged: " in line and message in line, line
    assert not (tmp_path / "cal").exists()
