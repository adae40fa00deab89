"""Inputs that cannot work are one line, exit 2, before anything runs (issue 37 items 7, 8, 10, 14):
a boolean is no number, an infinite or NaN float is no setting, a PODNet with more proxies than
a class has images, a model too large for the machine, and a resume on changed data that names
the split that changed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config, tiny_dict
from pydantic import BaseModel, ConfigDict

from cilkit.cli import main
from cilkit.common.errors import UserError
from cilkit.settings.config import RunConfig, apply_overrides, validate
from cilkit.settings.registry import register_source


def _error_line(capsys, argv: list[str]) -> str:
    """The one ``error:`` line of a command that must exit 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _config_file(tmp_path: Path, **changes) -> Path:
    data = {**tiny_dict(tmp_path), "threads": 1, "state0_cache": None, **changes}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _refusal(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        tiny_config(tmp_path, "threads=1", *overrides)
    text = str(e.value)
    assert "\n" not in text
    return text


# ----- item 7: a boolean is no number -------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("memory.total=true", "memory.total"),
    ("memory.per_class=false", "memory.per_class"),
    ("train.epochs=true", "train.epochs"),
    ("train.lr=true", "train.lr"),
    ("seed=true", "seed"),
    ("scenario.order=true", "scenario.order"),
    ("train.schedule.milestones=[2, true]", "train.schedule.milestones"),
    ("data.channels=true", "data.channels"),
    ("data.mean=[0.5, true]", "data.mean"),
    ("threads=true", "threads"),
    ("podnet.proxies_per_class=true", "podnet.proxies_per_class"),
    ("wa.lambda_kd=true", "wa.lambda_kd"),
])
def test_a_boolean_where_a_number_is_expected_is_refused(tmp_path, override, key):
    """issue 37 item 7: ``true`` was taken as 1 (``memory.total``, ``train.epochs``, ``train.lr``,
    ``seed``, ``podnet.proxies_per_class``); in every config model, a method's options too, it
    is now refused in one line naming the key."""
    text = _refusal(tmp_path, override)
    assert f"'{key}'" in text and "boolean" in text, text


def test_numbers_given_as_yaml_reads_them_still_work(tmp_path):
    """issue 37 item 7: what strictness must not refuse: an int for a float, the string YAML
    makes of ``1e-3`` (``--set train.lr=1e-3``), a boolean where a boolean is expected."""
    config = tiny_config(tmp_path, "threads=1", "train.lr=1", "train.lr_first=1e-3", "amp=true",
                         "podnet.finetune=false", "data.mean=[0, 0.5]")
    assert config.train.lr == 1.0 and config.train.lr_first == 0.001 and config.amp is True
    assert config.method_options("podnet")["finetune"] is False and config.data.mean == [0.0, 0.5]


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=inf", "train.lr"),  # YAML reads "inf" as a string, pydantic as a float
    ("train.momentum=.inf", "train.momentum"),
    ("dist_timeout_s=.inf", "dist_timeout_s"),
    ("scenario.imbalance.ratio=.inf", "scenario.imbalance.ratio"),
    ("data.std=[.nan]", "data.std"),
    ("lucir.lambda_base=.inf", "lucir.lambda_base"),
])
def test_an_infinite_or_nan_float_is_refused(tmp_path, override, key):
    """issue 37 item 7: no float setting takes an infinity or NaN."""
    text = _refusal(tmp_path, override)
    assert f"'{key}'" in text and "finite" in text, text


@pytest.mark.parametrize("override, key, said", [
    ("train.lr=1e300", "train.lr", "float32"),  # finite in Python, inf in float32: overflowed inside SGD
    ("train.lr=-1.0e39", "train.lr", "float32"),
    ("podnet.nca_margin=1e12", "podnet.nca_margin", "less than or equal to 2"),  # trained at chance, silently
])
def test_a_float_that_cannot_work_is_refused(tmp_path, override, key, said):
    """issue 37 items 1 and 7: a float past float32's range (3.4e38) is infinite where training
    computes; a NCA margin past 2, the span of a cosine similarity, leaves the true class unable
    to win (the run fell to chance, 0.28 % top-1, without a word)."""
    text = _refusal(tmp_path, override)
    assert f"'{key}'" in text and said in text, text


class _Options(BaseModel):  # a plugin reader's options: a plain pydantic model, not cilkit's
    model_config = ConfigDict(extra="forbid")
    limit: int = 5
    scale: float = 1.0


@register_source("digits_test_strict_options", "test only: digits with options of a plain pydantic model",
                 options=_Options)
def _read(cfg):  # pragma: no cover - never read
    raise AssertionError


@pytest.mark.parametrize("option, value", [("limit", True), ("scale", math.inf)])
def test_a_plugin_readers_options_are_strict_numbers_too(tmp_path, option, value):
    """issue 37 item 7: a reader's ``data.options`` model (a plugin's plain BaseModel) is held
    to the same rule."""
    data = {**tiny_dict(tmp_path), "data": {"name": "digits_test_strict_options", "options": {option: value}}}
    with pytest.raises(UserError, match=f"'data.options.{option}'"):
        validate(data)


def _podnet_counts(tmp_path: Path, proxies: int, counts: list[int], val: int = 0) -> Path:
    return _config_file(tmp_path, method="podnet", podnet={"proxies_per_class": proxies},
                        scenario={"initial": 4, "increment": 3, "states": 3, "val_per_class": val,
                                  "imbalance": {"profile": "counts", "counts": counts, "ordering": "position"}})


COUNTS = [30, 30, 30, 30, 20, 20, 9, 20, 20, 12]  # the fewest: 9 training images (class position 6)


@pytest.mark.parametrize("proxies, val", [(10, 0), (8, 2)])
def test_more_podnet_proxies_than_images_of_a_class_is_refused(tmp_path, capsys, proxies, val):
    """issue 37 item 7: ``podnet.proxies_per_class`` above the fewest training images of a class
    (here 9 kept by the imbalance counts, 7 once 2 per class are held out for validation) ran
    180x slower at chance until killed; now one line before any directory is made."""
    out = tmp_path / "run"
    line = _error_line(capsys, ["run", str(_podnet_counts(tmp_path, proxies, COUNTS, val)), "--out", str(out)])
    assert "podnet.proxies_per_class" in line and f"{9 - val} training images" in line, line
    assert not out.exists()


def test_as_many_podnet_proxies_as_images_passes_the_check(tmp_path):
    """issue 37 item 7: the bound is inclusive: 9 proxies for the class of 9 images is allowed."""
    from cilkit.run.setup import check_protocol

    config = validate(yaml.safe_load(_podnet_counts(tmp_path, 9, COUNTS).read_text()))
    check_protocol(config)


# ----- item 8: an infinite method option is one line, not a traceback -----------------------------
@pytest.mark.parametrize("override", ["podnet.finetune_lr=.inf", "podnet.gamma=.inf", "ssil.temperature=.inf"])
def test_an_infinite_method_option_is_one_line(tmp_path, capsys, override):
    """issue 37 item 8: these gave a pydantic ValidationError traceback out of check_protocol."""
    method, key = override.split("=")[0].split(".")
    out = tmp_path / "run"
    line = _error_line(capsys, ["run", str(_config_file(tmp_path)), "--set", f"method={method}",
                                "--set", override, "--out", str(out)])
    assert f"'{method}.{key}'" in line and "finite" in line, line
    assert not out.exists()


def test_a_method_config_that_does_not_validate_again_is_one_line(tmp_path):
    """issue 37 item 8: ``for_method`` re-validates the resolved config; where that fails (a
    plugin's option whose dumped value its own model refuses) the user gets one line naming
    the method and the key, never a ValidationError."""
    config = tiny_config(tmp_path, "threads=1")
    broken = config.model_copy(update={"train": config.train.model_copy(update={"lr": -1.0})})  # unvalidated
    with pytest.raises(UserError) as e:
        broken.for_method("finetune")
    assert "'train.lr'" in str(e.value) and "finetune" in str(e.value) and "\n" not in str(e.value)


# ----- item 10: a model too large for the machine -------------------------------------------------
def _convnet_parameters(width: int, channels: int) -> int:
    """convnet's parameters, counted from its definition (models/small.py): four 3x3 convs
    without bias (c->w, w->w, w->2w, 2w->2w), a BatchNorm (weight and bias) after each, and a
    head with no class yet."""
    w = width
    return 9 * (channels * w + w * w + w * 2 * w + 2 * w * 2 * w) + 2 * (w + w + 2 * w + 2 * w)


def test_the_model_size_is_estimated_without_allocating_it(tmp_path):
    """issue 37 item 10: at ``model.width=3000000000`` the estimate on the meta device failed
    (a tensor of more elements than int64 holds) and returned nothing, so the real build
    allocated 108 GB. The estimate is now the exact count, computed without building it."""
    from cilkit.methods import METHODS
    from cilkit.run.setup import estimated_model_bytes

    for width in (8, 3_000_000_000):
        config = tiny_config(tmp_path, "threads=1", f"model.width={width}")
        assert estimated_model_bytes(METHODS["finetune"](config), 1, 8) == 4 * _convnet_parameters(width, 1)


def test_a_model_the_meta_device_cannot_build_is_not_sized_and_its_own_error_still_raises(tmp_path):
    """A plugin model whose constructor reads a value (``.item()``) cannot be built on the meta
    device: its size is unknown (None, the RAM check skipped) rather than a refused run; an error
    of the model's own (which its real build raises too) is not swallowed."""
    import torch

    from cilkit.methods import METHODS
    from cilkit.run.setup import check_model_size, estimated_model_bytes

    base = METHODS["finetune"]

    class ReadsAValue(base):  # type: ignore[misc, valid-type]
        def build_model(self, channels: int, size: int) -> torch.nn.Module:
            layer = torch.nn.Linear(channels * size * size, 4)
            layer.weight.abs().max().item()  # on the meta device: "cannot be called on meta tensors"
            return layer

    class Broken(base):  # type: ignore[misc, valid-type]
        def build_model(self, channels: int, size: int) -> torch.nn.Module:
            raise RuntimeError("backbone 'mine' needs 3 channels")

    config = tiny_config(tmp_path, "threads=1")
    method = ReadsAValue(config)
    assert estimated_model_bytes(method, 1, 8) is None
    check_model_size(config, method, 1, 8)  # nothing to refuse on
    assert sum(p.numel() for p in method.build_model(1, 8).parameters()) == 64 * 4 + 4  # the real build works
    with pytest.raises(RuntimeError, match="needs 3 channels"):
        estimated_model_bytes(Broken(config), 1, 8)


def test_a_model_wider_than_the_machine_is_one_line(tmp_path, capsys):
    """issue 37 item 10: refused before anything is built, naming ``model.width`` and the size."""
    out = tmp_path / "run"
    line = _error_line(capsys, ["run", str(_config_file(tmp_path)), "--set", "model.width=3000000000",
                                "--out", str(out)])
    weights_gib = 4 * _convnet_parameters(3_000_000_000, 1) / 2**30
    assert "'model.width'" in line and f"{weights_gib:.1f} GiB" in line and "memory" in line, line
    assert not out.exists()


# ----- item 14: a resume on changed data names the split that changed ----------------------------
def _image_folder(root: Path) -> None:
    from PIL import Image

    for split, per_class in (("train", 6), ("test", 3)):
        for c in range(4):
            for i in range(per_class):
                path = root / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(torch.full((8, 8), 40 * c + 10 * (i % 3), dtype=torch.uint8).numpy()).save(path)


@pytest.mark.parametrize("split, deleted, changed", [
    ("test", "class2/1.png", "class 'class2' has 2 test images, it had 3"),
    ("train", "class1/4.png", "class 'class1' has 5 training images, it had 6"),
])
def test_a_resume_on_changed_data_names_the_split(tmp_path, capsys, split, deleted, changed):
    """issue 37 item 14: deleting a test image named ``train/`` as the data that changed; the
    refusal now names the split's folder and the class whose images changed."""
    from cilkit.run.loop import Run

    _image_folder(tmp_path / "data")
    data = {**tiny_dict(tmp_path), "threads": 1, "state0_cache": None,
            "data": {"name": "imagefolder", "root": str(tmp_path / "data"), "workers": 0},
            "scenario": {"order": [0, 1, 2, 3], "initial": 2, "increment": 1},
            "memory": {"total": 4}, "train": {"epochs": 1, "batch_size": 8, "lr": 0.05}}
    out = tmp_path / "run"
    Run(RunConfig.model_validate(apply_overrides(data, [])), out, progress=False).execute(until_state=0)
    (tmp_path / "data" / split / deleted).unlink()
    line = _error_line(capsys, ["run", "--resume", str(out)])
    assert f"'{tmp_path / 'data' / split}'" in line and changed in line, line
    other = "train" if split == "test" else "test"
    assert f"'{tmp_path / 'data' / other}'" not in line


def test_a_checkpoint_with_the_bare_data_digest_still_resumes(tmp_path):
    """issue 37 item 14: checkpoints written before the splits were kept hold the digest of the
    whole data alone (sha256 of the two splits' content digests): the same data still matches
    it, other data is refused naming both splits."""
    import hashlib

    from cilkit.data import load_dataset
    from cilkit.data.fingerprint import data_change, fingerprint

    _image_folder(tmp_path / "data")
    config = tiny_config(tmp_path, "threads=1", "data.name=imagefolder", f"data.root={tmp_path / 'data'}",
                         "data.workers=0")
    dataset = load_dataset(config.data)
    old = hashlib.sha256("\0".join(s.content_digest(torch.arange(len(s))) for s in (dataset.train, dataset.test))
                         .encode()).hexdigest()
    now = fingerprint(dataset)
    assert data_change(old, dataset, now) is None
    changed = data_change("0" * 64, dataset, now)
    assert changed is not None and all(str(tmp_path / "data" / s) in changed.subject for s in ("train", "test"))
