"""A run directory that cannot be mixed, overwritten or resumed against another protocol; a
state-0 cache that cannot serve a stale or foreign model; every failure one line (issue 15)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import one_error_line, snapshot, strip_timings, tiny_config

from cilkit.common import io
from cilkit.cli import main
from cilkit.data import load_dataset
from cilkit.data.base import TensorImages
from cilkit.data.files import FileImages
from cilkit.common.errors import UserError
from cilkit.methods import register
from cilkit.methods.finetune import Finetune
from cilkit.rundir.layout import DirectoryLock, fresh_directory
from cilkit.run.loop import Run


def write_config(tmp_path: Path, *overrides: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, *overrides).to_dict()))
    return path


def run_cli(*args: str) -> int:
    return main(["run", *args])




@pytest.fixture
def finished(tmp_path, capsys) -> Path:
    """A finished 3-state finetune run in tmp_path/run, every checkpoint kept."""
    assert run_cli(str(write_config(tmp_path, "keep_checkpoints=all")), "--out", str(tmp_path / "run")) == 0
    capsys.readouterr()
    return tmp_path / "run"


# ----- item 1: a resume checks the config against the checkpoint -------------------------------
@pytest.mark.parametrize("key,value,named", [
    ("scenario.increment", 1, "scenario.increment"),
    ("seed", 4, "seed"),
    ("method", "lucir", "method"),
    ("data.name", "fashion-mnist", "data.name"),
])
@pytest.mark.slow
def test_resume_refuses_an_edited_config_and_names_the_keys(finished, capsys, key, value, named):
    ckpts = sorted((finished / "checkpoints").glob("*.pt"))
    ckpts[-1].unlink()  # interrupted after state 2: a resume would train state 3
    cfg_file = finished / "config.yaml"
    data = yaml.safe_load(cfg_file.read_text())
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    cfg_file.write_text(yaml.safe_dump(data))
    before = snapshot(finished)
    assert run_cli("--resume", str(finished)) == 2
    line = one_error_line(capsys)
    assert named in line and "differs from checkpoint" in line
    assert snapshot(finished) == before


@pytest.mark.slow
def test_resume_may_change_threads_only_and_says_so(finished, capsys):
    (sorted((finished / "checkpoints").glob("*.pt"))[-1]).unlink()
    assert run_cli("--resume", str(finished), "--set", "seed=5") == 2
    assert "only --set threads=N" in one_error_line(capsys)
    assert run_cli("--resume", str(finished), "--set", "threads=1") == 0
    assert "resuming with threads=1 instead of the recorded 2" in capsys.readouterr().out


@pytest.mark.slow
def test_the_resolved_thread_count_is_recorded(tmp_path, capsys):
    assert run_cli(str(write_config(tmp_path, "threads=null")), "--out", str(tmp_path / "r")) == 0
    recorded = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["threads"]
    assert recorded == len(os.sched_getaffinity(0))
    ckpt = io.load_torch(sorted((tmp_path / "r" / "checkpoints").glob("*.pt"))[-1])
    assert json.loads(ckpt["config"])["threads"] == recorded


# ----- item 2: the run directory is claimed --------------------------------------------------
@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_without_overwrite(finished, tmp_path, capsys):
    before = snapshot(finished)
    assert run_cli(str(write_config(tmp_path, "seed=9")), "--out", str(finished)) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert snapshot(finished) == before


@pytest.mark.slow
def test_overwrite_clears_the_old_run_including_its_later_states(finished, tmp_path, capsys):
    assert (finished / "scores" / "state_02.npz").is_file()
    cfg = write_config(tmp_path, "scenario.states=2", "scenario.initial=5", "scenario.increment=5")
    assert run_cli(str(cfg), "--out", str(finished), "--overwrite") == 0
    assert sorted(p.name for p in (finished / "scores").iterdir()) == ["state_00.npz", "state_01.npz"]
    assert json.loads((finished / "results.json").read_text())["num_states"] == 2
    assert [p.name for p in (finished / "checkpoints").iterdir()] == ["state_01.pt"]


def test_a_directory_of_foreign_files_is_refused_even_with_overwrite(tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "notes.txt").write_text("keep me\n")
    before = snapshot(mine)
    for extra in ([], ["--overwrite"]):
        assert run_cli(str(write_config(tmp_path)), "--out", str(mine), *extra) == 2
        assert "notes.txt" in one_error_line(capsys)
    assert snapshot(mine) == before


def test_a_second_run_into_a_locked_directory_fails_at_once(tmp_path, capsys):
    target = tmp_path / "busy"
    with DirectoryLock(target):  # another run holds it
        assert run_cli(str(write_config(tmp_path)), "--out", str(target)) == 2
        assert "in use by another cilkit run" in one_error_line(capsys)
        assert run_cli("--resume", str(target)) == 2
    assert not (target / "results.json").exists()


def _claim(base: str) -> str:
    return str(fresh_directory(Path(base)))


@pytest.mark.slow
def test_runs_started_together_get_distinct_default_directories(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        dirs = pool.map(_claim, [str(tmp_path / "runs" / "quickstart")] * 8)
    assert len(set(dirs)) == 8


@pytest.mark.slow
def test_a_failed_start_creates_and_touches_nothing(finished, tmp_path, capsys):
    assert run_cli(str(write_config(tmp_path)), "--set", "model.backbone=vgg") == 2
    assert "model.backbone" in one_error_line(capsys)
    assert run_cli(str(write_config(tmp_path)), "--set", "data.name=folder",
                   "--set", f"data.root={tmp_path / 'missing'}") == 2
    capsys.readouterr()
    assert not (tmp_path / "runs").exists()
    before = snapshot(finished)
    assert run_cli(str(write_config(tmp_path)), "--set", "scenario.initial=11", "--out", str(finished),
                   "--overwrite") == 2
    capsys.readouterr()
    assert snapshot(finished) == before


def test_ctrl_c_names_the_run_directory(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cilkit.cli.run_methods", interrupted)
    assert run_cli(str(write_config(tmp_path)), "--out", str(tmp_path / "r")) == 130
    assert f"cilkit run --resume {tmp_path / 'r'}" in capsys.readouterr().err


# ----- item 3: the state-0 cache --------------------------------------------------------------
def test_tensor_images_digest_follows_pixels_and_labels():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    idx = torch.arange(4)
    base = TensorImages(images.clone(), labels.clone()).content_digest(idx)
    assert TensorImages(images.clone(), labels.clone()).content_digest(idx) == base
    changed = images.clone()
    changed[2, 0, 3, 3] = 1
    assert TensorImages(changed, labels.clone()).content_digest(idx) != base
    assert TensorImages(images.clone(), labels.flip(0)).content_digest(idx) != base


def test_file_images_digest_follows_rewritten_files_and_labels(tmp_path):
    from PIL import Image

    paths = []
    for k in range(3):
        p = tmp_path / f"{k}.png"
        Image.fromarray(np.full((8, 8), 40 * k, dtype=np.uint8)).save(p)
        paths.append(str(p))
    idx = torch.arange(3)
    digest = FileImages(paths, torch.tensor([0, 1, 1]), image_size=8).content_digest(idx)
    assert FileImages(paths, torch.tensor([0, 1, 0]), image_size=8).content_digest(idx) != digest
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # whatever the clock's resolution
    assert FileImages(paths, torch.tensor([0, 1, 1]), image_size=8).content_digest(idx) != digest


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing keys"])
@pytest.mark.slow
def test_an_unusable_cache_entry_is_a_miss_with_one_warning(tmp_path, capsys, damage):
    cfg = tiny_config(tmp_path, "scenario.states=2")
    cold = Run(cfg, tmp_path / "cold", progress=False).execute()
    (entry,) = (tmp_path / "cache").glob("*.pt")  # beside each entry: its lock file
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(os.urandom(len(data)))
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        io.write_torch(entry, {"model": {}})
    capsys.readouterr()
    again = Run(cfg, tmp_path / "again", progress=False).execute()
    out = capsys.readouterr().out
    assert out.count("warning: state-0 cache entry") == 1 and str(entry) in out
    assert strip_timings(again) == strip_timings(cold)
    assert io.load_torch(entry)["fit"]  # rewritten by the run that retrained


def test_an_unwritable_cache_is_a_warning_not_a_crash(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tiny_config(tmp_path, "scenario.states=2", f"state0_cache={blocker / 'cache'}")
    res = Run(cfg, tmp_path / "r", progress=False).execute()
    assert res["complete"]
    assert "warning: the state-0 cache was not written" in capsys.readouterr().out


@register("finetune_label_smoothing_test")
class _SmoothedFinetune(Finetune):
    """A user's method: fine-tuning with another loss (and nothing else changed)."""

    description = "test only"

    def loss(self, ctx, batch, out):
        return torch.nn.functional.cross_entropy(out["logits"], batch.y, label_smoothing=0.5)


def test_a_method_with_another_state0_loss_never_gets_the_cached_model(tmp_path, capsys):
    Run(tiny_config(tmp_path, "scenario.states=1"), tmp_path / "ft", progress=False).execute()
    capsys.readouterr()
    res = Run(tiny_config(tmp_path, "scenario.states=1", "method=finetune_label_smoothing_test"),
              tmp_path / "mine", progress=False).execute()
    assert "reusing the cached" not in capsys.readouterr().out
    assert res["states"][0]["state0_cached"] is False


def test_changed_training_images_are_a_cache_miss(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "scenario.states=1")
    Run(cfg, tmp_path / "a", progress=False).execute()
    same = Run(cfg, tmp_path / "b", progress=False).execute()
    assert same["states"][0]["state0_cached"] is True
    data = load_dataset(cfg.data)
    data.train.images = data.train.images // 2  # same config, other pixels
    res = Run(cfg, tmp_path / "c", progress=False, dataset=data).execute()
    assert res["states"][0]["state0_cached"] is False


# ----- item 8: a cache hit and a cold run are bit-identical -----------------------------------
@pytest.mark.parametrize("selection", ["random", "herding"])
@pytest.mark.slow
def test_cache_hit_and_cold_run_give_identical_results(tmp_path, selection):
    cached = tiny_config(tmp_path, f"memory.selection={selection}")
    cold = tiny_config(tmp_path, f"memory.selection={selection}", "state0_cache=null")
    first = Run(cached, tmp_path / "first", progress=False).execute()
    hit = Run(cached, tmp_path / "hit", progress=False).execute()
    none = Run(cold, tmp_path / "none", progress=False).execute()
    assert first["states"][0]["state0_cached"] is False and hit["states"][0]["state0_cached"] is True
    assert strip_timings(hit) == strip_timings(none) == strip_timings(first)
    for b in range(3):
        a, h = np.load(tmp_path / "none" / "scores" / f"state_{b:02d}.npz"), \
            np.load(tmp_path / "hit" / "scores" / f"state_{b:02d}.npz")
        assert all(np.array_equal(a[k], h[k]) for k in a.files)


# ----- item 7: I/O failures -------------------------------------------------------------------
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "results.json"
    io.write_json(target, {"good": 1})

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=r"cannot write '.*results.json': No space left on device"):
        io.atomic_write(target, full)
    assert json.loads(target.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_output_directory_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_cli(str(write_config(tmp_path)), "--out", str(blocker / "run")) == 2
    assert "a-file" in one_error_line(capsys)


@pytest.mark.slow
def test_calibrate_with_a_foreign_statistics_file_is_one_line(finished, capsys):
    (finished / "stats" / "state_01.json").write_text(json.dumps({"something": "else"}))
    assert main(["calibrate", str(finished), "--with", "il2m"]) == 2
    line = one_error_line(capsys)
    assert "state_01.json" in line and "not a cilkit statistics file" in line


class _SmoothingConfig(Finetune.Config):  # type: ignore[name-defined,misc]
    smoothing: float = 0.0


@register("finetune_smoothing_option_test")
class _OptionFinetune(Finetune):
    """A user's method whose loss reads its own option (and declares nothing)."""

    description = "test only"
    Config = _SmoothingConfig

    def loss(self, ctx, batch, out):
        return torch.nn.functional.cross_entropy(out["logits"], batch.y, label_smoothing=self.cfg.smoothing)


def test_the_cache_key_holds_every_method_option_not_declared_free(tmp_path, capsys):
    def cached(*overrides: str) -> bool:
        res = Run(tiny_config(tmp_path, "scenario.states=1", *overrides), tmp_path / f"r{len(list(tmp_path.iterdir()))}",
                  progress=False).execute()
        return res["states"][0]["state0_cached"]

    mine = "method=finetune_smoothing_option_test"
    assert not cached(mine, "finetune_smoothing_option_test.smoothing=0.0")
    assert cached(mine, "finetune_smoothing_option_test.smoothing=0.0")
    assert not cached(mine, "finetune_smoothing_option_test.smoothing=0.4")  # same code, other option
    # declared free (read from state 1 on only): shared
    assert not cached("method=lucir", "lucir.lambda_base=5")
    assert cached("method=lucir", "lucir.lambda_base=1", "lucir.margin=0.2")
    assert not cached("method=finetune")
    assert cached("method=il2m", "il2m.guard_nonpositive=true")  # IL2M trains as fine-tuning


@pytest.mark.slow
def test_a_taken_out_directory_is_refused_before_the_data_is_read(finished, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr("cilkit.run.loop.load_dataset", never)
    assert run_cli(str(write_config(tmp_path)), "--out", str(finished)) == 2
    assert "holds a cilkit run" in one_error_line(capsys)
