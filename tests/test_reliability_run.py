"""Nothing silently reused, mixed or overwritten (issue 21): the state-0 cache keyed on the
code that runs and on every setting, resume that checks its data and config, directories a run
may not take, and the config errors that must be one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import one_line_error, strip_timings, tiny_config, tiny_dict

import cilkit
from cilkit.cli import main
from cilkit.common.errors import UserError
from cilkit.rundir.layout import RUN_MARKER, RunLayout
from cilkit.run.loop import Run
from cilkit.run.state0cache import cache_file

PACKAGE = Path(cilkit.__file__).parent
REUSED = "reusing the cached state-0 model"


# ----- the state-0 cache ---------------------------------------------------------------------------
EDITS = {  # file -> (text, replacement): a transform, a backbone, a helper a loss calls
    "data/transforms.py": ("x = x.to(torch.float32).div_(255.0)", "x = x.to(torch.float32).div_(255.0).mul_(0.9)"),
    "models/backbones.py": ("return torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)",
                            "return torch.flatten(F.adaptive_max_pool2d(last, 1), 1)"),
    "methods/icarl.py": ('reduction="sum") / (logits.shape[0] * divisor)',
                         'reduction="sum") / (logits.shape[0] * divisor * 2)'),
}


def _run_copy(root: Path, config: Path, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cilkit", "run", str(config), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    assert str(root) in subprocess.run([sys.executable, "-c", "import cilkit; print(cilkit.__file__)"],
                                       capture_output=True, text=True, env=env, cwd=root).stdout
    return done.stdout + done.stderr


@pytest.mark.slow
def test_an_edit_anywhere_in_the_package_is_a_cache_miss(tmp_path):
    """A copy of the package with one edit (a transform, a backbone, a helper called from a
    loss) never reuses the entry the unedited code trained."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**tiny_dict(tmp_path), "method": "icarl", "threads": 1,
                                      "scenario": {"initial": 4, "increment": 3, "states": 1},
                                      "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}}))
    pristine = tmp_path / "pristine"
    shutil.copytree(PACKAGE, pristine / "cilkit", ignore=shutil.ignore_patterns("__pycache__"))
    first = _run_copy(pristine, config, tmp_path / "a")
    assert REUSED not in first
    assert REUSED in _run_copy(pristine, config, tmp_path / "b")  # the same code: a hit
    for k, (rel, (old, new)) in enumerate(EDITS.items()):
        copy = tmp_path / f"edit{k}"
        shutil.copytree(pristine, copy, ignore=shutil.ignore_patterns("__pycache__"))
        path = copy / "cilkit" / rel
        text = path.read_text()
        assert old in text, rel
        path.write_text(text.replace(old, new))
        assert REUSED not in _run_copy(copy, config, tmp_path / f"out{k}"), rel


def test_a_renamed_or_copied_entry_is_a_miss_with_one_warning(tmp_path, capsys):
    a = tiny_config(tmp_path, "threads=1", "scenario.states=1", "train.epochs=1")
    b = tiny_config(tmp_path, "threads=1", "scenario.states=1", "train.epochs=1", "seed=4")
    cache = Path(a.state0_cache)
    Run(a, tmp_path / "a", progress=False).execute()
    (entry_a,) = cache.glob("*.pt")
    Run(b, tmp_path / "b0", progress=False).execute()
    (entry_b,) = set(cache.glob("*.pt")) - {entry_a}
    shutil.copy(entry_a, entry_b)  # another key's entry under b's name
    capsys.readouterr()
    results = Run(b, tmp_path / "b", progress=False).execute()
    out = capsys.readouterr().out
    assert REUSED not in out and out.count("it holds another key: a renamed or copied entry") == 1
    assert results["states"][0]["state0_cached"] is False


def test_the_key_holds_threads_and_compile(tmp_path):
    entries = {Run(tiny_config(tmp_path, *sets), tmp_path / f"r{k}", progress=False).state0_entry().path
               for k, sets in enumerate([["threads=1"], ["threads=2"], ["threads=1", "compile=true"]])}
    assert len(entries) == 3
    assert cache_file(tmp_path, "d", {"a": 1}).key != cache_file(tmp_path, "d", {"a": 2}).key


# ----- resume ----------------------------------------------------------------------------------------
def _list_dataset(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    lines = {"train": [], "test": []}
    for split, per_class in (("train", 6), ("test", 2)):
        for c in range(4):
            for i in range(per_class):
                path = root / split / f"{c}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                value = 40 * c + 10 * (i % 3)
                Image.fromarray(torch.full((8, 8), value, dtype=torch.uint8).numpy()).save(path)
                lines[split].append(f"{split}/{c}_{i}.png {c}")
    for split in lines:
        (root / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    return root / "train.txt", root / "test.txt"


@pytest.mark.slow
def test_resume_on_changed_data_is_refused_naming_the_file(tmp_path, capsys):
    train, test = _list_dataset(tmp_path / "data")
    cfg = {**tiny_dict(tmp_path), "threads": 1, "state0_cache": None,
           "data": {"name": "listfile", "train_list": str(train), "test_list": str(test)},
           "scenario": {"order": [0, 1, 2, 3], "initial": 2, "increment": 1},
           "memory": {"total": 4}, "train": {"epochs": 1, "batch_size": 8, "lr": 0.05}}
    config = tmp_path / "list.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    run = Run(tiny_config(tmp_path, **{k: v for k, v in cfg.items()}), out, progress=False)
    run.execute(until_state=1)
    lines = train.read_text().splitlines()
    swapped = [line.replace(" 0", " 9").replace(" 1", " 0").replace(" 9", " 1") for line in lines]
    train.write_text("\n".join(swapped) + "\n")  # two seen classes' labels swapped
    err = one_line_error(capsys, ["run", "--resume", str(out)])
    assert str(train) in err and "not what the finished states" in err


@pytest.mark.slow
def test_resume_without_a_checkpoint_checks_the_config_and_clears_the_old_states(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "threads=1", "state0_cache=null", "train.epochs=1")
    out = tmp_path / "r"
    Run(cfg, out, progress=False).execute()
    shutil.rmtree(out / "checkpoints")
    data = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**data, "scenario": {**data["scenario"], "initial": 3}}))
    err = one_line_error(capsys, ["run", "--resume", str(out)])
    assert "scenario.initial" in err and RUN_MARKER in err
    # the same config: a fresh start over it leaves none of the old run's later files
    (out / "config.yaml").write_text(yaml.safe_dump({**data, "scenario": {**data["scenario"], "states": 2}}))
    marker = json.loads((out / RUN_MARKER).read_text())
    marker["config"]["scenario"]["states"] = 2  # as if the run had started with 2 states
    (out / RUN_MARKER).write_text(json.dumps(marker))
    assert main(["run", "--resume", str(out)]) == 0
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["state_00.npz", "state_01.npz"]
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["state_00.json", "state_01.json"]
    assert json.loads((out / "results.json").read_text())["num_states"] == 2


@pytest.mark.slow
def test_a_truncated_results_file_is_rebuilt_on_resume(tmp_path):
    cfg = tiny_config(tmp_path, "threads=1", "state0_cache=null", "train.epochs=1", "scenario.states=2")
    out = tmp_path / "r"
    full = Run(cfg, out, progress=False).execute()
    results = RunLayout(out).results
    results.write_text(results.read_text()[:100])
    assert main(["run", "--resume", str(out)]) == 0
    assert strip_timings(json.loads(results.read_text())) == strip_timings(json.loads(json.dumps(full)))


# ----- directories ---------------------------------------------------------------------------------
def test_a_users_config_yaml_is_not_a_run(tmp_path, capsys):
    mine = tmp_path / "myexp"
    mine.mkdir()
    text = "# my experiment\n" + yaml.safe_dump({**tiny_dict(tmp_path), "threads": 1})
    (mine / "config.yaml").write_text(text)
    for extra in ([], ["--overwrite"]):
        err = one_line_error(capsys, ["run", str(mine / "config.yaml"), "--out", str(mine), *extra])
        assert "not a cilkit run" in err and "config.yaml" in err
    err = one_line_error(capsys, ["run", "--resume", str(mine)])
    assert "not a cilkit run directory" in err
    assert (mine / "config.yaml").read_text() == text  # untouched


@pytest.mark.slow
def test_a_run_inside_another_run_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_dict(tmp_path), "threads": 1, "train": {"epochs": 1},
                                   "scenario": {"initial": 4, "increment": 3, "states": 2}}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "outer")]) == 0
    err = one_line_error(capsys, ["run", str(cfg), "--out", str(tmp_path / "outer" / "inner")])
    assert "inside the cilkit run" in err
    assert not (tmp_path / "outer" / "inner").exists()


@pytest.mark.slow
def test_overwrite_never_follows_a_symlink_out_of_the_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_dict(tmp_path), "threads": 1, "train": {"epochs": 1},
                                   "scenario": {"initial": 4, "increment": 3, "states": 2}}))
    out = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    shutil.rmtree(out / "report")
    (out / "report").symlink_to(elsewhere, target_is_directory=True)
    assert main(["run", str(cfg), "--out", str(out), "--overwrite"]) == 0
    assert (elsewhere / "keep.txt").read_text() == "mine"  # the link went, not what it points to
    assert (out / "report").is_dir() and not (out / "report").is_symlink()


def test_overwrite_checks_everything_before_removing_anything(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root may remove files from a read-only directory")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_dict(tmp_path), "threads": 1, "train": {"epochs": 1},
                                   "scenario": {"initial": 4, "increment": 3, "states": 2}}))
    out = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    (out / "stats").chmod(0o500)
    try:
        err = one_line_error(capsys, ["run", str(cfg), "--out", str(out), "--overwrite"])
        assert "nothing was removed" in err and (out / "scores").is_dir()
    finally:
        (out / "stats").chmod(0o700)


def test_a_failed_start_leaves_a_directory_a_run_may_take(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".cilkit.lock").write_text("")
    (out / "run.log").write_text("")
    cfg = tiny_config(tmp_path, "threads=1", "train.epochs=1", "scenario.states=2")
    from cilkit.runs.multirun import run_methods

    run_methods(cfg, out)
    assert json.loads((out / "results.json").read_text())["complete"]


# ----- what a config may ask for ----------------------------------------------------------------------
def test_memory_that_keeps_every_old_image_is_said(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "threads=1", "train.epochs=1", "scenario.states=2", "memory.total=100000")
    Run(cfg, tmp_path / "r", progress=False).execute()
    out = capsys.readouterr().out
    assert "warning: config key 'memory.total': 100000 keeps every old training image" in out
    capsys.readouterr()
    Run(tiny_config(tmp_path, "threads=1", "train.epochs=1", "scenario.states=2"), tmp_path / "s",
        progress=False).execute()
    assert "keeps every old training image" not in capsys.readouterr().out


@pytest.mark.parametrize(("setting", "expected"), [
    ("scenario.order=-5", "scenario.order"), ("scenario.order=4294967296", "scenario.order"),
    ("model.width=100000", "model.width"),
])
def test_impossible_settings_are_one_line(tmp_path, capsys, setting, expected):
    err = one_line_error(capsys, ["run", "--set", setting, "--out", str(tmp_path / "r")])
    assert expected in err
    assert not (tmp_path / "r").exists()


def test_a_config_that_is_a_directory_or_not_utf8_is_one_line(tmp_path, capsys):
    assert "is a directory" in one_line_error(capsys, ["run", str(tmp_path), "--out", str(tmp_path / "r")])
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"seed: 1\nname: \xff\xfe\n")
    assert "not UTF-8" in one_line_error(capsys, ["run", str(bad), "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="not UTF-8"):
        from cilkit.settings.config import read_yaml

        read_yaml(bad)
