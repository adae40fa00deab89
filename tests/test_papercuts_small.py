"""The smaller papercuts of issue 26 (item 14): "did you mean" for unknown keys and names, an
imagefolder's test set split off train/, class names in list files, the packaged configs
after any install, lock files that go with their run, the memory that holds all old data."""

import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import one_error_line, tiny_config, tiny_dict
from PIL import Image

from cilkit.common import locks
from cilkit.cli import main
from cilkit.settings.config import DataConfig, load_config, validate
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.describe import describe
from cilkit.common.errors import UserError, did_you_mean, unknown_name
from cilkit.models.backbones import build_backbone
from cilkit.settings.packaged import packaged_configs, resolve_config
from cilkit.run import setup
from cilkit.rundir.layout import LOCK_NAME, DirectoryLock
from cilkit.run.loop import Run
from cilkit.runs.multirun import run_methods
from cilkit.run.state0cache import CacheEntry, entry_lock

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "is it in a plugin? pass --plugin FILE"


def run_error(capsys, tmp_path, *argv: str) -> str:
    """The one error line of ``cilkit run ...`` (exit status 2), nothing written."""
    capsys.readouterr()
    assert main(["run", *argv, "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    return one_error_line(capsys)


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


# ----- did you mean ---------------------------------------------------------------------------
def test_the_suggestion_text_is_one_helper():
    assert did_you_mean("icrl", ["icarl", "lucir", "bic"]) == "did you mean 'icarl'?"
    assert did_you_mean("zzz", ["icarl"]) == ""
    line = unknown_name("method", "icrl", ["icarl", "bic"], plugin=True)
    assert line == f"unknown method 'icrl': did you mean 'icarl'? (known: bic, icarl; {PLUGIN})"
    assert unknown_name("rectifier", "nope", ["il2m"]) == "unknown rectifier 'nope' (known: il2m)"


@pytest.mark.parametrize(("setting", "expected"), [
    ("memroy.total=5", "unknown key 'memroy': did you mean 'memory'"),  # or 'memo', the method's options: both close
    ("memory.totl=5", "unknown key 'memory.totl': did you mean 'memory.total'?"),
    ("icarl.temprature=2", "unknown key 'icarl.temprature': did you mean 'icarl.temperature'?"),
    ("memory.selection=herdng", "unknown selection strategy 'herdng': did you mean 'herding'? (known: herding, random)"),
    ("train.schedule.type=cosin", "did you mean 'cosine'?"),
])
def test_a_misspelt_key_or_value_names_the_closest(tmp_path, capsys, setting, expected):
    err = run_error(capsys, tmp_path, "--set", setting)
    assert expected in err
    assert PLUGIN not in err  # keys and fixed values are no plugin's


@pytest.mark.parametrize(("setting", "expected"), [
    ("method=icrl", "unknown method 'icrl': did you mean 'icarl'?"),
    ("data.name=fashion-mnst", "unknown dataset 'fashion-mnst': did you mean 'fashion-mnist'?"),
    ("model.backbone=resnet23", "unknown backbone 'resnet23': did you mean 'resnet32'"),
])
def test_a_misspelt_registry_name_names_the_closest_and_the_plugin_option(tmp_path, capsys, setting, expected):
    err = run_error(capsys, tmp_path, "--set", setting)
    assert expected in err and err.endswith(f"{PLUGIN})")


def test_the_lookups_past_the_config_say_the_same(capsys):
    with pytest.raises(UserError, match=f"did you mean 'digits'.*{re.escape(PLUGIN)}"):
        load_dataset(DataConfig().model_copy(update={"name": "digit"}))  # past the config's own check
    with pytest.raises(UserError, match=f"did you mean 'resnet32'.*{re.escape(PLUGIN)}"):
        build_backbone("resnet33", in_channels=1, image_size=8)
    with pytest.raises(UserError, match="did you mean 'icarl'"):
        describe("icrl")
    assert main(["calibrate", "nowhere", "--with", "il2n"]) == 2
    assert "did you mean 'il2m'?" in one_error_line(capsys)


# ----- imagefolder: a test set split off train/ -------------------------------------------------
def image_folder(root: Path, per_class: int = 10, test: bool = False) -> Path:
    for c, name in enumerate(("cat", "dog", "eel")):
        for i in range(per_class):
            write_image(root / "train" / name / f"{i:02d}.png", 100 * c + i)
            if test and i < 2:
                write_image(root / "val" / name / f"{i:02d}.png", 1000 + 100 * c + i)
    return root


def folder_config(root: Path, **keys) -> DataConfig:
    return validate({"data": {"name": "imagefolder", "root": str(root), "workers": 0, **keys}}).data


def test_an_imagefolder_without_a_test_folder_splits_off_a_fixed_stratified_test_set(tmp_path):
    cfg = folder_config(image_folder(tmp_path), test_fraction=0.3)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.class_names == ["cat", "dog", "eel"]
    assert np.bincount(a.test.labels.numpy()).tolist() == [3, 3, 3]
    assert np.bincount(a.train.labels.numpy()).tolist() == [7, 7, 7]
    assert a.test.paths == b.test.paths  # fixed: the same split every time, whatever the seed
    assert not set(a.test.paths) & set(a.train.paths)
    assert any("split off train/" in note for note in a.notes)


def test_an_imagefolder_without_a_test_folder_or_the_key_names_the_key(tmp_path):
    cfg = folder_config(image_folder(tmp_path))
    assert cfg.test_fraction is None  # unset: no split unless asked
    with pytest.raises(UserError, match=r"neither 'val/' nor 'test/' found \(set data\.test_fraction"):
        load_dataset(cfg)


def test_an_imagefolder_with_a_test_folder_keeps_it(tmp_path):
    ds = load_dataset(folder_config(image_folder(tmp_path, per_class=3, test=True)))
    assert len(ds.test) == 6 and all("/val/" in p for p in ds.test.paths)


def test_a_class_of_one_image_cannot_be_split(tmp_path):
    with pytest.raises(UserError, match=r"data\.test_fraction': class 'cat' has 1 image"):
        load_dataset(folder_config(image_folder(tmp_path, per_class=1), test_fraction=0.2))


def test_digits_keep_their_split_and_their_recorded_value():
    cfg = validate({})
    assert cfg.data.test_fraction == 0.2 and cfg.to_dict()["data"]["test_fraction"] == 0.2  # as cilkit always wrote
    assert validate({"data": {"test_fraction": None}}).data.test_fraction == 0.2
    ds, given = load_dataset(cfg.data), load_dataset(validate({"data": {"test_fraction": 0.2}}).data)
    assert (len(ds.train), len(ds.test)) == (1438, 359)  # round(0.2 n) of each class, as before
    assert ds.test.labels.tolist() == given.test.labels.tolist() and bool((ds.test.images == given.test.images).all())


# ----- class names in list files ----------------------------------------------------------------
def named_lists(root: Path, train: str, test: str) -> DataConfig:
    for i in range(4):
        write_image(root / "img" / f"{i}.png", i)
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    return DataConfig(name="listfile", train_list=str(root / "train.txt"), test_list=str(root / "test.txt"),
                      image_size=8, workers=0)


def test_list_files_may_name_their_classes_in_sorted_order(tmp_path):
    cfg = named_lists(tmp_path, "img/0.png zebra\nimg/1.png cat\nimg/2.png mouse\n",
                      "img/3.png cat\nimg/0.png zebra\nimg/1.png mouse\n")
    ds = load_dataset(cfg)
    assert ds.class_names == ["cat", "mouse", "zebra"]
    assert ds.train.labels.tolist() == [2, 0, 1] and ds.test.labels.tolist() == [0, 2, 1]


def test_plain_digits_are_still_class_ids(tmp_path):
    ds = load_dataset(named_lists(tmp_path, "img/0.png 1\nimg/1.png 0\n", "img/2.png 0\nimg/3.png 1\n"))
    assert ds.class_names == ["0", "1"] and ds.train.labels.tolist() == [1, 0]


@pytest.mark.parametrize(("train", "test", "expected"), [
    ("img/0.png 0\nimg/1.png cat\n", "img/2.png 0\n", r"train\.txt line 2: expected 'path label' with a class id"),
    ("img/0.png cat\nimg/1.png 1\n", "img/2.png cat\n", r"train\.txt line 2: expected 'path label' with a class name"),
    ("img/0.png cat\nimg/1.png dog\n", "img/2.png cat\nimg/3.png dgo\n",
     r"test\.txt line 2: class 'dgo' is not a training class: did you mean 'dog'\?"),
    ("img/0.png cat\nimg/1.png dog\n", "img/2.png 0\n", r"test\.txt line 1: expected 'path label' with a class name"),
    ("img/0.png cat\nimg/1.png dog\n", "img/2.png cat\n", r"test\.txt: class 'dog' of '.*train\.txt' has no test images"),
])
def test_a_list_mixing_ids_and_names_or_naming_an_unseen_class_is_one_line(tmp_path, train, test, expected):
    with pytest.raises(UserError, match=expected):
        load_dataset(named_lists(tmp_path, train, test))


# ----- the packaged configs -------------------------------------------------------------------
def test_a_bare_name_is_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    packaged = resources.files("cilkit").joinpath("configs", "fashion-mnist.yaml")
    assert resolve_config("fashion-mnist").read_text() == packaged.read_text()
    assert resolve_config("fashion-mnist.yaml") == resolve_config("fashion-mnist")
    assert load_config("fashion-mnist").data.name == "fashion-mnist"
    (tmp_path / "fashion-mnist").write_text("name: mine\n")  # a file of that name comes first
    assert load_config("fashion-mnist").name == "mine"


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = run_error(capsys, tmp_path, "fashion-mnst")
    assert "did you mean 'fashion-mnist'" in err and "packaged: active-cifar100, " in err
    assert "cilkit configs" in err


def test_cilkit_configs_lists_the_packaged_configs_with_their_line(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("fashion-mnist "))
    assert "Fashion-MNIST, 5 states of 2 classes" in line
    assert set(packaged_configs()) >= {"quickstart", "fashion-mnist", "lucir-cifar100-b50-5steps"}


@pytest.mark.slow
def test_the_repository_configs_are_the_package_data_one_copy(tmp_path):
    """configs/ of the checkout is the package's folder (one copy), and a wheel carries it."""
    assert (ROOT / "configs").resolve() == (ROOT / "src" / "cilkit" / "configs").resolve()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cilkit"]
    folder = ROOT / "src" / "cilkit" / "configs"
    shipped = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.yaml"))
    assert "ablations/sir-fashion-mnist.yaml" in shipped
    assert all(any(fnmatch(f"configs/{name}", pat) for pat in patterns) for name in shipped)
    work = tmp_path / "project"  # a copy: the build writes nothing into the checkout
    shutil.copytree(ROOT / "src" / "cilkit", work / "src" / "cilkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, work / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist")], cwd=work, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))) as wheel:
        assert {f"cilkit/configs/{name}" for name in shipped} <= set(wheel.namelist())


# ----- lock files go with their run -----------------------------------------------------------
@pytest.mark.slow
def test_no_lock_file_is_left_after_a_run_and_a_second_run_is_still_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_dict(tmp_path), "threads": 1, "scenario": {"initial": 4, "increment": 3,
                                   "states": 2}, "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}}))
    out = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert not (out / LOCK_NAME).exists()
    assert not list((tmp_path / "cache").glob("*.lock"))  # the state-0 entry's lock went too
    with DirectoryLock(out):  # another run holds it
        assert (out / LOCK_NAME).exists()
        assert main(["run", "--resume", str(out)]) == 2
        assert "in use by another cilkit run" in one_error_line(capsys)
    assert not (out / LOCK_NAME).exists()


def test_no_lock_file_is_left_after_a_failed_run(tmp_path, monkeypatch):
    def boom(self, b):
        raise RuntimeError("a failure in state 1")

    monkeypatch.setattr(Run, "run_state", boom)
    out = tmp_path / "r"
    with pytest.raises(Exception, match="a failure in state 1"):
        run_methods(tiny_config(tmp_path, "threads=1", "scenario.states=2"), out)
    assert out.is_dir() and not (out / LOCK_NAME).exists()


def test_a_waiter_never_holds_a_removed_lock_file(tmp_path):
    """A process waiting while the holder removes the file locks the file now at the path (it
    tries again), so that a third process cannot lock that same name at the same time."""
    path = tmp_path / "x.lock"
    held = locks.acquire(path)
    got: list = []
    waiting = threading.Event()
    waiter = threading.Thread(target=lambda: got.append(locks.acquire(path, on_wait=waiting.set)))
    waiter.start()
    assert waiting.wait(10)
    locks.release(held, path)  # removes x.lock while holding it
    waiter.join(10)
    assert got and path.exists()
    assert os.fstat(got[0].fileno()).st_ino == os.stat(path).st_ino  # the waiter holds the file at the path
    with pytest.raises(BlockingIOError):
        locks.acquire(path, wait=False)  # so a newcomer is refused
    locks.release(got[0], path)
    assert not path.exists()


def test_the_state0_entry_lock_is_removed_after_its_block(tmp_path):
    entry = CacheEntry(tmp_path / "cache" / "digits-0123.pt", "{}")
    with entry_lock(entry, print):
        assert (tmp_path / "cache" / "digits-0123.pt.lock").exists()
    assert not (tmp_path / "cache" / "digits-0123.pt.lock").exists()


# ----- a memory that holds all old training data ----------------------------------------------
@pytest.mark.parametrize("setting", ["memory.per_class=100000", "memory.total=100000"])
def test_a_memory_that_keeps_every_old_image_says_the_protocol_is_not_incremental(tmp_path, setting):
    cfg = tiny_config(tmp_path, "memory.total=null", setting, "scenario.states=3")
    text = setup.memory_covers_old_data(cfg, setup.build_scenario(cfg, load_dataset(cfg.data)))
    key = setting.split("=")[0]
    assert text is not None and text.startswith(f"config key '{key}': 100000 keeps every old training image from state 2 on")
    assert "the protocol is not incremental there" in text


def test_a_total_that_covers_the_first_states_only_names_them(tmp_path):
    """Digits: about 144 training images per class. 600 in total keep every image of 4 old
    classes (150 each) but not of 7 (85 each)."""
    cfg = tiny_config(tmp_path, "memory.total=600", "scenario.states=3")
    dataset: Dataset = load_dataset(cfg.data)
    text = setup.memory_covers_old_data(cfg, setup.build_scenario(cfg, dataset))
    assert text is not None and "keeps every old training image in state 2 (" in text
    assert setup.memory_covers_old_data(tiny_config(tmp_path), setup.build_scenario(tiny_config(tmp_path), dataset)) is None
