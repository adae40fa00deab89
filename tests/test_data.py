"""Data sources: tiny files in each real format, loaded through ``load_dataset``."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cilkit.settings.config import DataConfig, SyntheticConfig
from cilkit.data import SOURCE_DESCRIPTIONS, SOURCES, load_dataset
from cilkit.data.base import Dataset, TensorImages
from cilkit.data.files import FileImages, resized_crop_box
from cilkit.data.transforms import Augment
from cilkit.common.errors import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def all_batches(images, indices, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = list(images.batches(indices, **kw))
    return tuple(torch.cat([b[i] for b in out]) for i in range(3))  # type: ignore[return-value]


# --------------------------------------------------------------------------- TensorImages


def test_tensor_images_augmented_batches_have_the_right_shapes() -> None:
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    ts = TensorImages(images, torch.arange(10) % 2)
    batches = list(
        ts.batches(
            torch.arange(10),
            4,
            mean=torch.zeros(3),
            std=torch.ones(3),
            augment=Augment(crop_pad=2, flip=True),
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
    )
    assert [b[0].shape for b in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert all(b[0].dtype == torch.float32 and b[1].dtype == torch.int64 for b in batches)
    idx = torch.cat([b[2] for b in batches])
    assert sorted(idx.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[1] for b in batches]), idx % 2)


def test_tensor_images_without_augment_are_just_normalised() -> None:
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    x, _, idx = all_batches(
        TensorImages(images, torch.zeros(6)), torch.tensor([4, 1, 3]), batch_size=2, mean=mean, std=std
    )
    expected = (images[[4, 1, 3]].float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert idx.tolist() == [4, 1, 3]
    torch.testing.assert_close(x, expected)


def test_tensor_images_shuffle_follows_the_generator() -> None:
    ts = TensorImages(torch.zeros((50, 1, 4, 4), dtype=torch.uint8), torch.zeros(50))

    def order(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return all_batches(
            ts, torch.arange(50), batch_size=8, mean=torch.zeros(1), std=torch.ones(1), shuffle=True, generator=g
        )[2].tolist()

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == list(range(50))


# --------------------------------------------------------------------------- CIFAR


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, 3072)).astype(np.uint8)


def test_cifar100_pixel_layout_and_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    train, test = cifar_rows(100, 0), cifar_rows(100, 1)
    # image 2, green channel, row 7, column 30 -> offset 1024 + 7 * 32 + 30 in its row
    train[2, 1024 + 7 * 32 + 30] = 123
    train_labels, test_labels = [99, *range(99)], [(i + 5) % 100 for i in range(100)]
    write_pickle(folder / "train", {b"data": train, b"fine_labels": train_labels, b"coarse_labels": [0] * 100})
    write_pickle(folder / "test", {b"data": test, b"fine_labels": test_labels})
    write_pickle(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)]})
    for root in (tmp_path, folder):  # the folder itself or its parent
        ds = load_dataset(DataConfig(name="cifar100", root=str(root)))
        assert ds.train.images.shape[1:] == (3, 32, 32) and len(ds.train) == 100 and len(ds.test) == 100
        assert ds.train.images[2, 1, 7, 30] == 123
        assert torch.equal(ds.train.images[0, 2].reshape(-1), torch.from_numpy(train[0, 2048:]))
        assert ds.train.labels.tolist() == train_labels and ds.test.labels.tolist() == test_labels
        assert ds.num_classes == 100 and ds.class_names[99] == "class99"
        assert ds.mean == (0.5071, 0.4866, 0.4409) and ds.augment == Augment(crop_pad=4, flip=True)


def test_cifar10_batches_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", {b"data": cifar_rows(2, i), b"labels": [10 - i, i - 1]})
    test = cifar_rows(10, 9)
    test[3, 2047] = 7  # green, last row, last column
    write_pickle(folder / "test_batch", {b"data": test, b"labels": list(range(10))})
    write_pickle(folder / "batches.meta", {b"label_names": [b"airplane"] + [f"c{i}".encode() for i in range(1, 10)]})
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert len(ds.train) == 10 and ds.train.labels.tolist() == [9, 0, 8, 1, 7, 2, 6, 3, 5, 4]
    assert ds.test.images[3, 1, 31, 31] == 7
    assert ds.class_names[0] == "airplane" and ds.std == (0.2470, 0.2435, 0.2616)


def test_cifar_corrupt_pickle_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="cifar-100-python/train"):
        load_dataset(DataConfig(name="cifar100", root=str(folder)))
    write_pickle(folder / "train", {b"data": cifar_rows(2, 0)})  # no labels
    with pytest.raises(UserError, match="train.*fine_labels"):
        load_dataset(DataConfig(name="cifar100", root=str(folder)))


# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    return header + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, gz: bool, n_train: int = 12, n_test: int = 10, size: int = 5) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte": rs.randint(0, 256, (n_train, size, size)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rs.randint(0, 256, (n_test, size, size)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_folder(tmp_path, gz)
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    assert ds.train.images.shape[1:] == (1, 5, 5) and len(ds.train) == 12 and len(ds.test) == 10
    assert np.array_equal(ds.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert ds.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test.labels.tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert ds.class_names == [str(i) for i in range(10)] and ds.mean == (0.1307,)
    assert ds.augment == Augment(crop_pad=2, flip=False)


def test_fashion_mnist_from_a_given_root(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=True)
    ds = load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.augment == Augment(crop_pad=2, flip=True) and ds.std == (0.3530,)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    bad = idx_bytes(np.zeros((12, 5, 5)), magic=bytes([0, 0, 9, 3]))  # 0x09 = signed bytes
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bad)
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*magic"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    write_idx_folder(tmp_path, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) - 20])
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))


def test_idx_count_mismatch_and_missing_file(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11)))
    with pytest.raises(UserError, match="12 images.*11 labels"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.*not found"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))


def test_label_out_of_range_is_a_user_error(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 10, 2, 3, 4, 5, 6, 7, 8])))
    with pytest.raises(UserError, match="test label 10 is outside 0..9"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)))


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.root is required for mnist"):
        load_dataset(DataConfig(name="mnist"))
    with pytest.raises(UserError, match="nowhere.*not found"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="data.root is required for imagefolder"):
        load_dataset(DataConfig(name="imagefolder"))


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} not present")
def test_real_fashion_mnist() -> None:
    ds = load_dataset(DataConfig(name="fashion-mnist"))
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.train.images.shape[1:] == (1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    mean, std = ds.train.channel_stats(torch.arange(60000))
    assert abs(mean.item() - 0.2860) < 1e-3 and abs(std.item() - 0.3530) < 1e-3


# --------------------------------------------------------------------------- digits, synthetic


def test_digits_fixed_stratified_split() -> None:
    a, b = load_dataset(DataConfig(name="digits")), load_dataset(DataConfig(name="digits"))
    assert len(a.train) + len(a.test) == 1797 and a.num_classes == 10
    assert a.train.images.shape[1:] == (1, 8, 8) and int(a.train.images.max()) == 255
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.labels, b.train.labels)
    total = torch.bincount(a.train.labels) + torch.bincount(a.test.labels)
    assert torch.equal(torch.bincount(a.test.labels), torch.round(total * 0.2).long())
    assert a.mean is None and a.augment == Augment(crop_pad=1, flip=False)


def test_synthetic_is_deterministic_and_separable() -> None:
    cfg = DataConfig(
        name="synthetic",
        synthetic=SyntheticConfig(num_classes=4, train_per_class=20, test_per_class=5, size=6, channels=3),
    )
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.train.images.shape[1:] == (3, 6, 6) and len(a.train) == 80 and len(a.test) == 20 and a.num_classes == 4
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    means = torch.stack([a.train.images[a.train.labels == c].float().mean(0) for c in range(4)])
    dist = ((a.test.images.float()[:, None] - means[None]) ** 2).sum(dim=(2, 3, 4))
    assert (dist.argmin(1) == a.test.labels).float().mean() > 0.95


# --------------------------------------------------------------------------- registry, overrides


def test_registry_and_unknown_name() -> None:
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic", "imagefolder", "listfile"} <= set(
        SOURCES
    )
    assert set(SOURCE_DESCRIPTIONS) == set(SOURCES)
    with pytest.raises(UserError, match=r"unknown dataset 'nope' \(known: .*digits"):
        # (DataConfig itself rejects the name too; build one without validation to reach the loader)
        load_dataset(DataConfig().model_copy(update={"name": "nope"}))


def test_overrides_of_stats_and_augment() -> None:
    ds = load_dataset(DataConfig(name="digits", mean=[0.5], std=[0.25], crop_pad=0, flip=True))
    assert ds.mean == (0.5,) and ds.std == (0.25,) and ds.augment == Augment(crop_pad=0, flip=True)
    with pytest.raises(UserError, match="data.mean.*1 channel"):
        load_dataset(DataConfig(name="digits", mean=[0.5, 0.5, 0.5]))


def test_check_labels_reports_the_bad_label() -> None:
    ts = TensorImages(torch.zeros((3, 1, 2, 2), dtype=torch.uint8), torch.tensor([0, 1, 5]))
    ds = Dataset(name="x", train=ts, test=ts, class_names=["a", "b"])
    with pytest.raises(UserError, match="train label 5 is outside 0..1"):
        ds.check_labels()


# --------------------------------------------------------------------------- image files


def write_png(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 14), gradient: bool = False
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.empty((size[1], size[0], 3), dtype=np.uint8)
    a[:] = colour
    if gradient:
        a[..., 0] = (np.arange(size[0]) * 255 // size[0])[None, :]
        a[..., 1] = (np.arange(size[1]) * 255 // size[1])[:, None]
    Image.fromarray(a).save(path)


COLOURS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "emu": (10, 10, 200)}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for name, colour in COLOURS.items():
            for i in range(n):
                write_png(tmp_path / split / name / f"{i}.PNG", colour, gradient=(name == "emu"))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_class_mapping_and_eval_batches(image_folder: Path) -> None:
    ds = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), image_size=8, workers=0))
    assert ds.class_names == ["cat", "dog", "emu"] and isinstance(ds.train, FileImages)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.train.resize == 9 and ds.augment == Augment(flip=True, resized_crop=True)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x, y, idx = all_batches(ds.test, torch.tensor([0, 3, 2]), batch_size=2, mean=mean, std=std)
    assert (
        x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and y.tolist() == [0, 1, 1] and idx.tolist() == [0, 3, 2]
    )
    # A solid image stays solid through resize and crop: exactly (colour / 255 - mean) / std.
    expected = (torch.tensor(COLOURS["dog"]) / 255 - mean) / std
    torch.testing.assert_close(x[1], expected.view(3, 1, 1).expand(3, 8, 8))


def test_imagefolder_training_crops_follow_the_generator_not_the_workers(image_folder: Path) -> None:
    ds = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), image_size=8, workers=0))
    kw = dict(batch_size=4, mean=torch.zeros(3), std=torch.ones(3), augment=ds.augment, shuffle=True)
    emu = torch.tensor([6, 7, 8, 6, 7, 8])

    def run(seed: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds.train.workers = workers
        x, _, idx = all_batches(ds.train, emu, generator=torch.Generator().manual_seed(seed), **kw)
        return x, idx

    x0, idx0 = run(0, 0)
    x1, idx1 = run(0, 1)
    assert x0.shape == (6, 3, 8, 8)
    assert torch.equal(idx0, idx1) and torch.equal(x0, x1)
    x2, _ = run(1, 0)
    assert not torch.equal(x0, x2)


def test_imagefolder_in_memory(image_folder: Path) -> None:
    ds = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), image_size=8, in_memory=True, workers=0))
    assert isinstance(ds.train, TensorImages) and ds.train.images.shape[1:] == (3, 8, 8) and len(ds.test) == 6
    assert ds.augment == Augment(crop_pad=1, flip=True)
    assert ds.train.images[0, :, 3, 3].tolist() == list(COLOURS["cat"])
    x, y, _ = all_batches(
        ds.train,
        torch.arange(9),
        batch_size=4,
        mean=torch.zeros(3),
        std=torch.ones(3),
        augment=ds.augment,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == (9, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_file_images_channel_stats_match_the_decoded_images(image_folder: Path) -> None:
    ds = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), image_size=8, workers=0))
    idx = torch.tensor([0, 4, 6, 8])
    decoded = TensorImages(ds.train.decode_all(), ds.train.labels)
    for got, want in zip(ds.train.channel_stats(idx), decoded.channel_stats(idx)):
        torch.testing.assert_close(got, want)


def test_imagefolder_errors(image_folder: Path) -> None:
    (image_folder / "val" / "dog" / "1.PNG").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cannot read image '.*val/dog/1\.PNG'"):  # at load, before training
        load_dataset(DataConfig(name="imagefolder", root=str(image_folder), image_size=8, workers=1))
    write_png(image_folder / "val" / "yak" / "0.png", (1, 2, 3))
    with pytest.raises(UserError, match="class 'yak' is not among the training classes"):
        load_dataset(DataConfig(name="imagefolder", root=str(image_folder)))


def test_resized_crop_box_stays_inside_the_image() -> None:
    rng = np.random.default_rng(0)
    for w, h in [(20, 14), (5, 300), (300, 5), (1, 1)]:
        for _ in range(20):
            left, top, right, bottom = resized_crop_box(w, h, rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h


def test_listfile(tmp_path: Path) -> None:
    write_png(tmp_path / "imgs" / "a.png", (0, 0, 0))
    write_png(tmp_path / "imgs" / "b b.png", (255, 255, 255))  # a space in the path
    (tmp_path / "train.txt").write_text("imgs/a.png 0\n\nimgs/b b.png 1\n")
    (tmp_path / "test.txt").write_text("imgs/b b.png 1\nimgs/a.png 0\n")
    cfg = DataConfig(
        name="listfile",
        train_list=str(tmp_path / "train.txt"),
        test_list=str(tmp_path / "test.txt"),
        image_size=8,
        workers=0,
    )
    ds = load_dataset(cfg)  # paths relative to the list file's folder
    assert ds.class_names == ["0", "1"] and ds.train.labels.tolist() == [0, 1] and ds.test.labels.tolist() == [1, 0]
    x, _, _ = all_batches(ds.train, torch.arange(2), batch_size=2, mean=torch.zeros(3), std=torch.ones(3))
    assert x.shape == (2, 3, 8, 8) and x[0].max() == 0 and x[1].min() == 1

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "test.txt").write_text("imgs/a.png 0\nimgs/a.png 1\n")
    ds = load_dataset(cfg.model_copy(update={"root": str(tmp_path), "test_list": str(tmp_path / "lists" / "test.txt")}))
    assert len(ds.test) == 2


def test_listfile_errors(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", (0, 0, 0))
    (tmp_path / "test.txt").write_text("a.png 0\n")
    train = tmp_path / "train.txt"
    cfg = DataConfig(name="listfile", train_list=str(train), test_list=str(tmp_path / "test.txt"))
    for text, message in [
        ("a.png 0\n\na.png zero\n", "train.txt line 3: expected 'path label'"),
        ("a.png\n", "train.txt line 1: expected 'path label'"),
        ("a.png 0\nmissing.png 1\n", "train.txt line 2: image '.*missing.png' not found"),
    ]:
        train.write_text(text)
        with pytest.raises(UserError, match=message):
            load_dataset(cfg)
    train.write_text("a.png 0\n")
    (tmp_path / "test.txt").write_text("a.png 1\n")
    with pytest.raises(UserError, match="test.txt line 1: label 1 is not a training class"):
        load_dataset(cfg)
    with pytest.raises(UserError, match="data.test_list is required"):
        load_dataset(DataConfig(name="listfile", train_list=str(train)))
