"""A bad data file, label or size is one clear line naming its source, never a traceback or a
silently wrong result: 16-bit PNGs, list-file labels, IDX headers, CIFAR values, synthetic sizes."""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_dict
from PIL import Image

from cilkit.cli import main
from cilkit.settings.config import DataConfig, SyntheticConfig
from cilkit.data import load_dataset
from cilkit.data.files import open_image
from cilkit.common.errors import UserError


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run_cli(tmp_path: Path, data: dict[str, Any]) -> int:
    """``cilkit run`` on the tiny protocol with ``data`` as its data section."""
    cfg = tiny_dict(tmp_path)
    cfg["data"] = data
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["run", str(path), "--out", str(tmp_path / "run")])


# ----- item 1: 16-bit PNGs keep their contrast --------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    """A uint8 grayscale picture spanning 0..255 (a ramp plus noise)."""
    rs = np.random.RandomState(seed)
    a = rs.randint(0, 256, (size[1], size[0])).astype(np.uint8)
    a[0, 0], a[0, 1] = 0, 255
    return a


def write_png_pair(eight: Path, sixteen: Path, a: np.ndarray) -> None:
    """``a`` as an 8-bit PNG and as a 16-bit PNG spanning 0..65535 (each value * 257)."""
    for p in (eight, sixteen):
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(eight)
    img16 = Image.fromarray(a.astype(np.uint16) * 257)
    assert img16.mode == "I;16"
    img16.save(sixteen)
    with Image.open(sixteen) as back:
        assert back.mode.startswith("I;16") or back.mode == "I", back.mode  # really 16 bits on disk
        assert int(np.asarray(back).max()) == 65535


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_16bit_png_decodes_like_its_8bit_version(tmp_path: Path, mode: str) -> None:
    a = picture(0)
    write_png_pair(tmp_path / "a8.png", tmp_path / "a16.png", a)
    got8 = np.asarray(open_image(str(tmp_path / "a8.png"), mode)).astype(int)
    got16 = np.asarray(open_image(str(tmp_path / "a16.png"), mode)).astype(int)
    assert got16.max() == 255 and got16.min() == 0
    assert np.abs(got8 - got16).max() <= 1


@pytest.mark.parametrize("in_memory", [False, True])
def test_16bit_png_imagefolder_matches_the_8bit_folder(tmp_path: Path, in_memory: bool) -> None:
    for split, n in (("train", 2), ("val", 1)):
        for c in range(2):
            for i in range(n):
                a = picture(10 * c + i + (5 if split == "val" else 0))
                name = f"{split}/c{c}/{i}.png"
                write_png_pair(tmp_path / "eight" / name, tmp_path / "sixteen" / name, a)

    def decoded(root: Path) -> torch.Tensor:
        ds = load_dataset(DataConfig(name="imagefolder", root=str(root), workers=0, in_memory=in_memory))
        assert ds.train.geometry[0] == 1  # 16-bit grayscale counts as grayscale
        return ds.train.images if in_memory else ds.train.decode_all()  # type: ignore[attr-defined]

    x8, x16 = decoded(tmp_path / "eight").int(), decoded(tmp_path / "sixteen").int()
    assert x8.shape == x16.shape and int(x16.max()) == 255
    assert int((x8 - x16).abs().max()) <= 1


# ----- item 2: list-file labels are plain ASCII decimal digits ----------------------------------


def write_listfile(tmp_path: Path, test_label: str) -> DataConfig:
    a = np.zeros((6, 6), dtype=np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(a).save(tmp_path / name)
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 1\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text(f"a.png 0\nb.png {test_label}\n", encoding="utf-8")
    return DataConfig(name="listfile", train_list=str(tmp_path / "train.txt"), test_list=str(tmp_path / "test.txt"))


@pytest.mark.parametrize("label", ["0_1", "+1", "\u0661", "\uff11"])
def test_list_label_must_be_ascii_digits(tmp_path: Path, label: str) -> None:
    cfg = write_listfile(tmp_path, label)
    with pytest.raises(UserError, match=r"test\.txt line 2: expected 'path label'"):
        load_dataset(cfg)


def test_list_label_with_underscore_is_one_cli_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_listfile(tmp_path, "0_1")
    assert run_cli(tmp_path, cfg.model_dump(include={"name", "train_list", "test_list"})) == 2
    line = one_error_line(capsys)
    assert "test.txt line 2: expected 'path label'" in line and "'b.png 0_1'" in line


# ----- item 3: IDX headers with negative or huge dimensions -------------------------------------


def idx_header(dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)


def write_mnist(folder: Path, train_images: bytes) -> Path:
    """The four MNIST files, with ``train_images`` as the raw training-image file."""
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    arrays = {
        "train-labels-idx1-ubyte": np.arange(12) % 10,
        "t10k-images-idx3-ubyte": rs.randint(0, 256, (10, 5, 5)),
        "t10k-labels-idx1-ubyte": np.arange(10) % 10,
    }
    for name, array in arrays.items():
        (folder / name).write_bytes(idx_header(array.shape) + array.astype(np.uint8).tobytes())
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(train_images)
    return path


@pytest.mark.parametrize(
    "dims,payload,claim",
    [
        ((-12, -5, 5), 300, "(-12, -5, 5)"),  # the int64 product matches the payload: reshape failed
        ((2**30, 2**30, 16), 0, str(2**64)),  # the int64 product wraps to 0: reshape failed
        ((2**31 - 1,) * 3, 300, str((2**31 - 1) ** 3)),  # an absurd negative size was reported
        ((12, 0, 5), 0, "(12, 0, 5)"),  # a zero image size: no pixels at all
    ],
)
def test_idx_header_dimensions_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dims: tuple[int, ...], payload: int, claim: str
) -> None:
    path = write_mnist(tmp_path / "mnist", idx_header(dims) + bytes(payload))
    with pytest.raises(UserError) as info:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path / "mnist")))
    message = str(info.value)
    assert str(path) in message and claim in message and f"holds {payload}" in message, message
    assert not re.search(r"-\d", message.replace(str(path), "").replace(str(dims), "")), message  # no negative size

    assert run_cli(tmp_path, {"name": "mnist", "root": str(tmp_path / "mnist")}) == 2
    line = one_error_line(capsys)
    assert str(path) in line and str(dims) in line


# ----- item 4: CIFAR values outside their types -------------------------------------------------


def write_cifar10(folder: Path, batch: dict[bytes, Any]) -> Path:
    """A CIFAR-10 folder whose first training batch is ``batch``; the others are sound."""
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    for i in range(1, 6):
        good = {b"data": rs.randint(0, 256, (2, 3072)).astype(np.uint8), b"labels": [i - 1, 10 - i]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch if i == 1 else good))
    test = {b"data": rs.randint(0, 256, (10, 3072)).astype(np.uint8), b"labels": list(range(10))}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return folder / "data_batch_1"


def rows(value: int | None = None) -> np.ndarray:
    a = np.random.RandomState(1).randint(0, 256, (2, 3072)).astype(np.int64)
    if value is not None:
        a[1, 5] = value
    return a


@pytest.mark.parametrize(
    "batch,field,shown",
    [
        ({b"data": rows(300), b"labels": [0, 1]}, "data", "300"),  # int64 array: wrapped to 44 silently
        ({b"data": rows(-1), b"labels": [0, 1]}, "data", "-1"),  # wrapped to 255 silently
        ({b"data": rows(256).tolist(), b"labels": [0, 1]}, "data", "256"),  # a list: OverflowError
        ({b"data": rows().astype(np.float64) / 255, b"labels": [0, 1]}, "data", "float64"),  # truncated to 0
        ({b"data": rows(), b"labels": [0, 2**70]}, "labels", str(2**70)),  # OverflowError
        ({b"data": rows(), b"labels": [0, 2**63]}, "labels", str(2**63)),  # read as float64
        ({b"data": rows(), b"labels": np.array([0, 2**63], dtype=np.uint64)}, "labels", str(2**63)),  # wrapped
    ],
)
def test_cifar_values_outside_their_type_name_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], batch: dict[bytes, Any], field: str, shown: str
) -> None:
    path = write_cifar10(tmp_path / "cifar-10-batches-py", batch)
    with pytest.raises(UserError) as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    message = str(info.value)
    assert str(path) in message and f"'{field}'" in message and shown in message, message

    assert run_cli(tmp_path, {"name": "cifar10", "root": str(tmp_path)}) == 2
    line = one_error_line(capsys)
    assert str(path) in line and f"'{field}'" in line


def test_cifar100_fine_labels_beyond_int64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((2, 3072), dtype=np.uint8)
    (folder / "train").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [2**64, 0]}))
    (folder / "test").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [0, 1]}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a", b"b"]}))
    assert run_cli(tmp_path, {"name": "cifar100", "root": str(tmp_path)}) == 2
    line = one_error_line(capsys)
    assert str(folder / "train") in line and "'fine_labels'" in line and str(2**64) in line


# ----- item 5: synthetic sizes beyond the machine's memory --------------------------------------


@pytest.mark.parametrize(
    "sizes,key",
    [
        ({"size": 10**7}, "data.synthetic.size"),
        ({"train_per_class": 10**13}, "data.synthetic.train_per_class"),
        ({"num_classes": 10**12, "size": 16}, "data.synthetic.num_classes"),
    ],
)
def test_synthetic_size_beyond_memory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sizes: dict[str, int], key: str
) -> None:
    with pytest.raises(UserError, match=rf"config key '{key}'.* GiB"):
        load_dataset(DataConfig(name="synthetic", synthetic=SyntheticConfig(**sizes)))
    assert run_cli(tmp_path, {"name": "synthetic", "synthetic": sizes}) == 2
    line = one_error_line(capsys)
    assert key in line and "GiB" in line


def test_synthetic_memory_fallback_without_sysconf(monkeypatch: pytest.MonkeyPatch) -> None:
    from cilkit.data import sources

    monkeypatch.delattr(sources.os, "sysconf", raising=False)
    with pytest.raises(UserError, match=r"config key 'data.synthetic.size'.* GiB"):
        load_dataset(DataConfig(name="synthetic", synthetic=SyntheticConfig(size=10**7)))
    ds = load_dataset(DataConfig(name="synthetic", synthetic=SyntheticConfig(num_classes=2, size=4)))
    assert len(ds.train) == 80
