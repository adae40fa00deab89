"""In-memory data sources: digits, MNIST / Fashion-MNIST (IDX), CIFAR-10/100 (pickles), synthetic.

Every reader returns a :class:`Dataset` whose train and test sets are :class:`TensorImages`.
Splits and synthetic data use fixed seeds of their own, never the run seed, so that the same
config always sees the same images.

CIFAR files are Python pickles, the official distribution format. Plain unpickling can run
code, so they are read by :class:`CifarUnpickler`, which builds numpy arrays and plain Python
values only and refuses any other reference a crafted file may hold.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from cilkit.settings.config import DEFAULT_TEST_FRACTION, DataConfig, SyntheticConfig
from cilkit.settings.registry import SOURCE_DESCRIPTIONS, register_source
from cilkit.data.base import Dataset, TensorImages
from cilkit.data.transforms import Augment
from cilkit.common.errors import UserError, reason
from cilkit.common.machine import physical_memory

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _tensor_set(images: np.ndarray, labels: np.ndarray) -> TensorImages:
    return TensorImages(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)), torch.from_numpy(labels.astype(np.int64))
    )


def _root_folder(cfg: DataConfig, default: str | None = None) -> Path:
    """``cfg.root`` (or ``default`` when unset) as an existing folder, else a UserError; unset,
    it says how to set it and what the folder holds (the reader's registered description): the
    paper configs leave ``data.root`` to the user."""
    root = cfg.root if cfg.root is not None else default
    if root is None:
        reads = SOURCE_DESCRIPTIONS.get(cfg.name)
        raise UserError(f"data.root is required for {cfg.name}: pass --set data.root=DIR or set it in the config"
                        + (f"; {cfg.name} reads {reads}" if reads else ""))
    path = Path(os.path.expanduser(root))
    if not path.is_dir():
        raise UserError(f"data.root '{root}': folder not found")
    return path


# --------------------------------------------------------------------------- digits


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: per class (in class order) a permutation from one RandomState(seed);
    the first ``round(n * test_fraction)`` (at least 1, at most n - 1) go to test. Sorted indices."""
    rs = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = idx[rs.permutation(idx.size)]
        n_test = min(max(int(round(idx.size * test_fraction)), 1), idx.size - 1)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@register_source("digits", "scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, no download)")
def read_digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits  # scikit-learn only when digits are read

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, cfg.test_fraction if cfg.test_fraction is not None else DEFAULT_TEST_FRACTION)
    return Dataset(
        name="digits",
        train=_tensor_set(images[train], labels[train]),
        test=_tensor_set(images[test], labels[test]),
        class_names=[str(i) for i in range(10)],
        augment=Augment(crop_pad=1, flip=False),
    )


# --------------------------------------------------------------------------- IDX (MNIST)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read '{path}': {reason(e)}") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (optionally gzipped)."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"'{path}' is not an IDX file of unsigned bytes (bad magic number {data[:4].hex() or 'empty'})")
    if data[3] != ndim:
        raise UserError(f"'{path}': expected a {ndim}-dimensional IDX array, found {data[3]} dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"'{path}' is truncated (the IDX header is incomplete)")
    dims = _idx_dims(path, data, ndim)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def _idx_dims(path: Path, data: bytes, ndim: int) -> tuple[int, ...]:
    """The header's dimensions, checked against the bytes that follow it. Each must be >= 1: a
    negative one is a corrupt header, and a zero (no images, or images of no pixels) cannot
    make a split. The size is a Python int: numpy's int64 product wraps on a crafted header."""
    dims = struct.unpack_from(f">{ndim}i", data, 4)
    held = len(data) - (4 + 4 * ndim)
    if min(dims) < 1:
        raise UserError(
            f"'{path}': the IDX header claims dimensions {dims}, but each must be at least 1 "
            f"(the file holds {held} bytes of data)"
        )
    claimed = math.prod(dims)
    if claimed != held:
        raise UserError(
            f"'{path}': the IDX header claims dimensions {dims}, {claimed} bytes of data, but the file holds {held}"
            + (" (truncated)" if held < claimed else "")
        )
    return dims


def _idx_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"'{root / name}' (or {name}.gz) not found")


def _idx_split(root: Path, split: str) -> tuple[TensorImages, Path]:
    """The images of one split and the label file they were read with."""
    image_path, label_path = (_idx_file(root, name) for name in IDX_FILES[split])
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"'{image_path}' holds {images.shape[0]} images but '{label_path}' holds {labels.shape[0]} labels"
        )
    return _tensor_set(images[:, None], labels), label_path


def _read_idx_dataset(cfg: DataConfig, name: str, default_root: str | None) -> Dataset:
    root = _root_folder(cfg, default_root)
    (train, train_labels), (test, test_labels) = _idx_split(root, "train"), _idx_split(root, "test")
    return Dataset(
        name=name,
        train=train,
        test=test,
        origin={"train": str(train_labels), "test": str(test_labels)},
        class_names=FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)],
        mean=(0.2860,) if name == "fashion-mnist" else (0.1307,),
        std=(0.3530,) if name == "fashion-mnist" else (0.3081,),
        augment=Augment(crop_pad=2, flip=name == "fashion-mnist"),
    )


@register_source("mnist", "MNIST from the four IDX files (optionally .gz) in data.root")
def read_mnist(cfg: DataConfig) -> Dataset:
    return _read_idx_dataset(cfg, "mnist", None)


@register_source("fashion-mnist", f"Fashion-MNIST from the four IDX files in data.root (default {FASHION_MNIST_ROOT})")
def read_fashion_mnist(cfg: DataConfig) -> Dataset:
    default = FASHION_MNIST_ROOT if os.path.isdir(FASHION_MNIST_ROOT) else None
    return _read_idx_dataset(cfg, "fashion-mnist", default)


# --------------------------------------------------------------------------- CIFAR


# What a CIFAR pickle may reference: numpy array and dtype reconstruction (numpy >= 2 writes
# numpy._core, older numpy and the official Python 2 files numpy.core), numpy scalars, the
# protocol-5 buffer constructor, and _codecs.encode, which Python 3 uses for bytes at protocol 2.
# Each builds data only; nothing here can reach a function that acts on the system.
def synthetic_images(patterns: np.ndarray, per_class: int, rs: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` noisy copies of each class pattern (K, C, S, S) in [0, 1], as uint8 images."""
    labels = np.repeat(np.arange(patterns.shape[0]), per_class)
    noise = rs.normal(0.0, 0.15, size=(labels.size, *patterns.shape[1:]))
    images = np.clip(patterns[labels] + noise, 0.0, 1.0)
    return np.rint(images * 255.0).astype(np.uint8), labels


ASSUMED_MEMORY = 2**40  # bytes, where the machine's physical memory cannot be read


def synthetic_bytes(s: SyntheticConfig) -> int:
    """Peak memory of :func:`read_synthetic`: the float64 patterns, the uint8 images and int64
    labels of both splits, and the four float64 arrays alive at once while one split is drawn."""
    pixels = s.channels * s.size * s.size
    n_train, n_test = s.num_classes * s.train_per_class, s.num_classes * s.test_per_class
    return 8 * s.num_classes * pixels + (n_train + n_test) * (pixels + 8) + 32 * max(n_train, n_test) * pixels


def _check_synthetic_memory(s: SyntheticConfig) -> None:
    """Refuse, before allocating, sizes that need more than the machine's memory; the message
    names the key that grew most over its default."""
    need = synthetic_bytes(s)
    memory = physical_memory()
    if need <= (memory if memory is not None else ASSUMED_MEMORY):
        return
    default = SyntheticConfig()
    growth = {
        "size": (s.size / default.size) ** 2,
        "num_classes": s.num_classes / default.num_classes,
        "train_per_class": s.train_per_class / default.train_per_class,
        "test_per_class": s.test_per_class / default.test_per_class,
    }
    key = max(growth, key=lambda k: growth[k])
    limit = (
        f"this machine's {memory / 2**30:.1f} GiB of memory"
        if memory is not None
        else f"the {ASSUMED_MEMORY / 2**30:.0f} GiB assumed (this machine's memory cannot be read)"
    )
    n = s.num_classes * (s.train_per_class + s.test_per_class)
    raise UserError(
        f"config key 'data.synthetic.{key}': {getattr(s, key)} would need {need / 2**30:.1f} GiB "
        f"for {n} synthetic images of {s.channels}x{s.size}x{s.size}, more than {limit}"
    )


@register_source(
    "synthetic", "seeded random class patterns plus noise (sizes from data.synthetic), for tests and demos"
)
def read_synthetic(cfg: DataConfig) -> Dataset:
    s = cfg.synthetic
    _check_synthetic_memory(s)
    rs = np.random.RandomState(0)  # fixed: the data never depend on the run seed
    patterns = rs.uniform(0.0, 1.0, size=(s.num_classes, s.channels, s.size, s.size))
    train = synthetic_images(patterns, s.train_per_class, rs)
    test = synthetic_images(patterns, s.test_per_class, rs)
    return Dataset(
        name="synthetic",
        train=_tensor_set(*train),
        test=_tensor_set(*test),
        class_names=[str(i) for i in range(s.num_classes)],
        augment=Augment(),
    )
