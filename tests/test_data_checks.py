"""Datasets are checked when they are loaded, before any training: labels, classes, files.

Each bad input is built in tmp_path in its real format; the user must get one line naming the
file (and line), from the reader or from ``cilkit run``.
"""

from __future__ import annotations

import fnmatch
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cilkit.cli import main
from cilkit.settings.config import DataConfig
from cilkit.data import load_dataset
from cilkit.common.errors import UserError


def write_image(path: Path, pixels: np.ndarray) -> Path:
    """Save (H, W) grayscale or (H, W, 3) colour uint8 pixels; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def colour(size: tuple[int, int] = (8, 8), seed: int = 0) -> np.ndarray:
    """A random colour image of (width, height) ``size``: any resampling would change it."""
    return np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3))


def image_folder(root: Path, classes: dict[str, int], val: int = 1, size: tuple[int, int] = (8, 8)) -> Path:
    """root/train/<class>/<i>.png (``classes[name]`` images) and root/val/<class>/<i>.png."""
    for c, (name, n) in enumerate(classes.items()):
        for split, count in (("train", n), ("val", val)):
            for i in range(count):
                write_image(root / split / name / f"{i:03d}.png", colour(size, seed=100 * c + i))
    return root


def list_dataset(root: Path, train: str, test: str, images: int = 3) -> DataConfig:
    """root/img/0.png .. and the two list files (their lines given as text)."""
    for i in range(images):
        write_image(root / "img" / f"{i}.png", colour(seed=i))
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    return DataConfig(
        name="listfile", train_list=str(root / "train.txt"), test_list=str(root / "test.txt"), image_size=8, workers=0
    )


def batch(images, n: int) -> torch.Tensor:
    """The first ``n`` images, decoded without augmentation, as float in [0, 1]."""
    c = images.channels
    return torch.cat(
        [x for x, _, _ in images.batches(torch.arange(n), n, mean=torch.zeros(c), std=torch.ones(c))]
    )


# --------------------------------------------------------------------------- labels and classes


def test_list_label_99_in_a_3_class_list_names_the_line(tmp_path: Path) -> None:
    cfg = list_dataset(tmp_path, "img/0.png 0\nimg/1.png 1\nimg/2.png 2\nimg/0.png 99\n", "img/0.png 0\n")
    with pytest.raises(UserError, match=r"train\.txt line 4: label 99 leaves classes 3\.\.98 without training images"):
        load_dataset(cfg)


def test_list_class_missing_from_the_test_list(tmp_path: Path) -> None:
    cfg = list_dataset(tmp_path, "img/0.png 0\nimg/1.png 1\nimg/2.png 2\n", "img/0.png 0\nimg/1.png 1\n")
    with pytest.raises(UserError, match=r"test\.txt: class 2 of '.*train\.txt' has no test images"):
        load_dataset(cfg)


def test_imagefolder_class_missing_from_val(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"cat": 2, "dog": 2})
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    (root / "val" / "dog").rmdir()
    with pytest.raises(UserError, match=r"class 'dog' has no test images: '.*val/dog' not found"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), workers=0))


def test_cifar_class_without_test_images_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    rows = np.zeros((10, 3072), dtype=np.uint8)
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", {b"data": rows[:2], b"labels": [2 * i - 2, 2 * i - 1]})
    write_pickle(folder / "test_batch", {b"data": rows[:9], b"labels": list(range(9))})  # no class 9
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    with pytest.raises(UserError, match=r"test_batch': class 9 \('c9'\) has no test images"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


# --------------------------------------------------------------------------- files decoded at load


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_image_is_found_at_load_first_bad_line_named(tmp_path: Path, suffix: str) -> None:
    for i in range(6):
        write_image(tmp_path / "img" / f"{i}.{suffix}", colour((64, 64), seed=i))
    for i in (4, 2):  # two broken files: the first in list order is named, whatever the threads do
        data = (tmp_path / "img" / f"{i}.{suffix}").read_bytes()
        (tmp_path / "img" / f"{i}.{suffix}").write_bytes(data[: len(data) // 2])
    (tmp_path / "train.txt").write_text("".join(f"img/{i}.{suffix} {i % 2}\n" for i in range(6)))
    (tmp_path / "test.txt").write_text(f"img/0.{suffix} 0\nimg/1.{suffix} 1\n")
    cfg = DataConfig(
        name="listfile", train_list=str(tmp_path / "train.txt"), test_list=str(tmp_path / "test.txt"), workers=2
    )
    with pytest.raises(UserError, match=rf"train\.txt line 3: cannot read image '.*img/2\.{suffix}': .*truncated"):
        load_dataset(cfg)


def test_quick_check_samples_but_still_catches_a_class_of_broken_files(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"ant": 150, "bee": 150, "emu": 1}, size=(4, 4))
    cfg = DataConfig(name="imagefolder", root=str(root), check="quick", workers=2)
    ds = load_dataset(cfg)
    # one image per (class, split) + 256 others, of 301 training + 3 test images
    assert "262 of 304 images decoded" in ds.notes[0] and len(ds.train) == 301
    (root / "train" / "emu" / "000.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image '.*train/emu/000\.png'"):
        load_dataset(cfg)


def test_imagefolder_notes_the_files_it_skips(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"cat": 2, "dog": 2})
    (root / "train" / "dog" / "README.txt").write_text("notes")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), workers=0))
    assert len(ds.train) == 4
    assert any("skipped 1 file(s) without an image extension" in n and "README.txt" in n for n in ds.notes)


# --------------------------------------------------------------------------- size and channels


def test_image_folder_keeps_its_native_size(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"cat": 2, "dog": 2}, size=(32, 32))
    for in_memory in (False, True):
        ds = load_dataset(DataConfig(name="imagefolder", root=str(root), in_memory=in_memory, workers=0))
        x = batch(ds.train, 1) if not in_memory else ds.train.images[:1].float() / 255
        assert x.shape == (1, 3, 32, 32)
        raw = np.array(Image.open(root / "train" / "cat" / "000.png"))
        torch.testing.assert_close(x[0], torch.from_numpy(raw).permute(2, 0, 1).float() / 255)  # not resampled
    assert "32x32 as stored" in ds.notes[1]


def test_non_square_native_size_gives_unscaled_centre_crops(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"cat": 1, "dog": 1}, size=(20, 14))
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), workers=0))
    raw = np.array(Image.open(root / "val" / "cat" / "000.png"))
    x = batch(ds.test, 1)
    assert x.shape == (1, 3, 14, 14)
    torch.testing.assert_close(x[0], torch.from_numpy(raw[:, 3:17]).permute(2, 0, 1).float() / 255)


def test_mixed_sizes_without_image_size_name_two_files(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"cat": 2, "dog": 2}, size=(32, 32))
    write_image(root / "train" / "dog" / "big.png", colour((48, 40)))
    with pytest.raises(UserError, match=r"'.*cat/000\.png' is 32x32 but '.*dog/big\.png' is 48x40; set data\.image_size"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), workers=0))
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), image_size=16, workers=0))
    assert batch(ds.train, 5).shape == (5, 3, 16, 16)


def test_grayscale_first_image_does_not_make_the_colour_ones_gray(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"cat": 2, "dog": 2})
    gray = np.random.RandomState(5).randint(0, 256, (8, 8))
    write_image(root / "train" / "cat" / "000.png", gray)  # alphabetically first
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), workers=0))
    x = batch(ds.train, 3)
    assert ds.train.channels == 3 and x.shape == (3, 3, 8, 8)
    torch.testing.assert_close(x[0], torch.from_numpy(gray).float().div(255).expand(3, 8, 8))
    assert not torch.equal(x[2][0], x[2][1])  # a colour image keeps its colours
    assert ds.notes[0].startswith("channels: 3") and "1 grayscale image(s) converted to RGB" in ds.notes[0]


def test_channels_key_forces_grayscale(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"cat": 2, "dog": 2})
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), channels=1, workers=0))
    assert ds.train.channels == 1 and batch(ds.train, 2).shape == (2, 1, 8, 8)
    assert "6 colour image(s) converted to grayscale" in ds.notes[0]


# --------------------------------------------------------------------------- list paths


def test_relative_lists_are_read_from_data_root(tmp_path: Path) -> None:
    data = tmp_path / "data"  # the working directory is tmp_path (see conftest)
    write_image(data / "img" / "a.png", colour())
    (data / "lists").mkdir()
    (data / "lists" / "train.txt").write_text("img/a.png 0\n")
    (data / "lists" / "test.txt").write_text("img/a.png 0\n")
    cfg = DataConfig(name="listfile", root=str(data), train_list="lists/train.txt", test_list="lists/test.txt")
    assert len(load_dataset(cfg).train) == 1
    (tmp_path / "elsewhere.txt").write_text("img/a.png 0\n")  # only in the working directory
    with pytest.raises(UserError, match=r"data\.test_list': list file '.*data/elsewhere\.txt' not found; .*data\.root"):
        load_dataset(cfg.model_copy(update={"test_list": "elsewhere.txt"}))


# --------------------------------------------------------------------------- CIFAR pickles


def write_pickle(path: Path, obj: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


class Touch:
    """Unpickling this creates ``marker``: the shape of a crafted file that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def crafted_cifar100(folder: Path, marker: Path) -> None:
    rows = np.zeros((100, 3072), dtype=np.uint8)
    write_pickle(folder / "train", {b"data": rows, b"fine_labels": list(range(100)), b"x": Touch(marker)})
    write_pickle(folder / "test", {b"data": rows, b"fine_labels": list(range(100))})
    write_pickle(folder / "meta", {b"fine_label_names": [b"c"] * 100})


def test_crafted_cifar_pickle_runs_nothing(tmp_path: Path) -> None:
    pickle.loads(pickle.dumps(Touch(tmp_path / "proof")))  # plain unpickling does run it
    assert (tmp_path / "proof").exists()
    folder = tmp_path / "cifar-100-python"
    crafted_cifar100(folder, tmp_path / "MARKER")
    with pytest.raises(UserError, match=r"cifar-100-python/train' is not a CIFAR pickle: it references pathlib\."):
        load_dataset(DataConfig(name="cifar100", root=str(folder)))
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_with_str_keys(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-100-python"
    rows = np.random.RandomState(0).randint(0, 256, (100, 3072)).astype(np.uint8)
    labels = list(range(99, -1, -1))
    write_pickle(folder / "train", {"data": rows, "fine_labels": labels, "coarse_labels": [0] * 100}, protocol)
    write_pickle(folder / "test", {"data": rows[:100], "fine_labels": list(range(100))}, protocol)
    write_pickle(folder / "meta", {"fine_label_names": [f"n{i}" for i in range(100)]}, protocol)
    if protocol == 2:  # as numpy < 2 and the official files spell it
        data = (folder / "train").read_bytes()
        (folder / "train").write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    assert ds.train.labels.tolist() == labels and ds.class_names[7] == "n7"
    assert torch.equal(ds.train.images.reshape(100, -1), torch.from_numpy(rows))


# --------------------------------------------------------------------------- through `cilkit run`


def _list_case(train: str, test: str, truncate: str | None = None) -> Callable[[Path], dict]:
    def build(root: Path) -> dict:
        cfg = list_dataset(root, train, test)
        if truncate:
            data = (root / truncate).read_bytes()
            (root / truncate).write_bytes(data[: len(data) // 2])
        return {"name": "listfile", "train_list": cfg.train_list, "test_list": cfg.test_list, "image_size": 8}

    return build


def _folder_case(change: Callable[[Path], None], **data: object) -> Callable[[Path], dict]:
    def build(root: Path) -> dict:
        image_folder(root, {"cat": 2, "dog": 2, "emu": 2})
        change(root)
        return {"name": "imagefolder", "root": str(root), **({"image_size": 8} | data)}

    return build


def _empty_class(root: Path) -> None:
    for f in (root / "train" / "dog").iterdir():
        f.unlink()


def _cifar_case(write_train: Callable[[Path], None]) -> Callable[[Path], dict]:
    def build(root: Path) -> dict:
        folder = root / "cifar-100-python"
        crafted_cifar100(folder, root / "MARKER")
        write_train(folder / "train")
        return {"name": "cifar100", "root": str(folder)}

    return build


# case -> (builder of the bad input under a folder, returning the data config; what the one line must say)
BAD_INPUTS: dict[str, tuple[Callable[[Path], dict], str]] = {
    "label 99 in a list": (
        _list_case("img/0.png 0\nimg/1.png 1\nimg/2.png 99\n", "img/0.png 0\n"),
        "*/train.txt line 3: label 99",
    ),
    "class without training images": (_folder_case(_empty_class), "class 'dog' has no training images: '*/train/dog'"),
    "class missing from the test list": (
        _list_case("img/0.png 0\nimg/1.png 1\n", "img/0.png 0\n"),
        "*/test.txt: class 1 of '*/train.txt' has no test images",
    ),
    "non-image file in an image folder": (
        _folder_case(lambda r: (r / "train" / "emu" / "notes.png").write_text("hello")),
        "cannot read image '*/train/emu/notes.png'",
    ),
    "truncated png": (
        _list_case("img/0.png 0\nimg/1.png 1\n", "img/0.png 0\nimg/1.png 1\n", truncate="img/1.png"),
        "*/train.txt line 2: cannot read image '*/img/1.png': image file is truncated",
    ),
    "missing file in a list": (
        _list_case("img/0.png 0\n", "img/0.png 0\nimg/7.png 0\n"),
        "*/test.txt line 2: image '*/img/7.png' not found",
    ),
    "crafted cifar pickle": (_cifar_case(lambda p: None), "'*/cifar-100-python/train' is not a CIFAR pickle: it references"),
    "cifar file that is not a pickle": (
        _cifar_case(lambda p: p.write_bytes(b"PK\x03\x04 a zip file")),
        "'*/cifar-100-python/train' is not a readable CIFAR pickle",
    ),
    "mixed sizes without image_size": (
        _folder_case(lambda r: write_image(r / "val" / "emu" / "wide.png", colour((12, 8))), image_size=None),
        "images differ in size: '*/train/cat/000.png' is 8x8 but '*/val/emu/wide.png' is 12x8",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cilkit_run_reports_a_bad_dataset_in_one_line(tmp_path: Path, capsys, case: str) -> None:
    build, expected = BAD_INPUTS[case]
    data = {k: v for k, v in build(tmp_path / "data").items() if v is not None}
    config = {
        "method": "finetune",
        "data": {**data, "workers": 0},
        "scenario": {"initial": 1, "increment": 1, "states": 2},
        "model": {"width": 8},
        "train": {"epochs": 1},
        "state0_cache": None,
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert fnmatch.fnmatchcase(err, f"error: *{expected}*"), err  # '*' stands for tmp_path
    assert not (tmp_path / "data" / "MARKER").exists()
