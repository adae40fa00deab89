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
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cilkit.config import DataConfig
from cilkit.registry import register_source
from cilkit.data.base import Dataset, TensorImages
from cilkit.data.transforms import Augment
from cilkit.errors import UserError, reason

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
    """``cfg.root`` (or ``default`` when unset) as an existing folder, else a UserError."""
    root = cfg.root if cfg.root is not None else default
    if root is None:
        raise UserError(f"data.root is required for {cfg.name}")
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
    train, test = stratified_split(labels, cfg.test_fraction)
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
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise UserError(
            f"'{path}': the header announces {expected} bytes of data {dims} but the file holds {len(data) - header}"
            + (" (truncated)" if len(data) - header < expected else "")
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


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
CIFAR_PICKLE_GLOBALS = frozenset(
    [
        *((f"{core}.multiarray", name) for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")),
        *((f"{core}.numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    ]
)


class _ForbiddenReference(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.reference = f"{module}.{name}"


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`CIFAR_PICKLE_GLOBALS`: a pickle naming any other
    class or function (the way a crafted file runs code) stops before anything is called."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise _ForbiddenReference(module, name)
        return super().find_class(module, name)


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict[str, object]:
    """Load one CIFAR pickle with :class:`CifarUnpickler` and check its keys. Keys may be
    bytes (the official files, written by Python 2) or str (files written by Python 3)."""
    if not path.is_file():
        raise UserError(f"'{path}' not found")
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, encoding="bytes").load()
    except _ForbiddenReference as e:
        raise UserError(
            f"'{path}' is not a CIFAR pickle: it references {e.reference} "
            "(only numpy arrays and plain values are read; nothing was run)"
        ) from None
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise UserError(f"'{path}' is not a readable CIFAR pickle ({type(e).__name__}: {reason(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' is not a CIFAR pickle (expected a dict, found {type(obj).__name__})")
    obj = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"'{path}' is not a CIFAR pickle: key(s) {', '.join(missing)} missing")
    return obj


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path, ("data", label_key))
    try:
        data = np.asarray(obj["data"], dtype=np.uint8)
        labels = np.asarray(obj[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise UserError(f"'{path}': unreadable data or labels ({reason(e)})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"'{path}': expected data of shape (N, 3072), found {data.shape}")
    if labels.shape != (data.shape[0],):
        raise UserError(f"'{path}' holds {data.shape[0]} images but {labels.size} labels")
    # Each row: 1024 red, then 1024 green, then 1024 blue values, each a row-major 32x32 plane.
    return data.reshape(-1, 3, 32, 32), labels


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and keys, and its known statistics."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    names_key: str
    label_key: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = CifarLayout(
    "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
    "batches.meta", "label_names", "labels", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
)  # fmt: skip
CIFAR100 = CifarLayout(
    "cifar100", "cifar-100-python", ("train",), "test",
    "meta", "fine_label_names", "fine_labels", (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023),
)  # fmt: skip


def _cifar_folder(cfg: DataConfig, layout: CifarLayout) -> Path:
    """``data.root`` may be the CIFAR folder itself or its parent."""
    root = _root_folder(cfg)
    if (root / layout.folder).is_dir():
        return root / layout.folder
    if (root / layout.train_files[0]).is_file():
        return root
    raise UserError(f"data.root '{cfg.root}': neither '{layout.folder}/' nor '{layout.train_files[0]}' found there")


def _class_names(path: Path, key: str) -> list[str]:
    names = _unpickle(path, (key,))[key]
    if not isinstance(names, (list, tuple)):
        raise UserError(f"'{path}': '{key}' is not a list of class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar(cfg: DataConfig, layout: CifarLayout) -> Dataset:
    folder = _cifar_folder(cfg, layout)
    parts = [_cifar_batch(folder / f, layout.label_key) for f in layout.train_files]
    return Dataset(
        name=layout.name,
        train=_tensor_set(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])),
        test=_tensor_set(*_cifar_batch(folder / layout.test_file, layout.label_key)),
        class_names=_class_names(folder / layout.meta_file, layout.names_key),
        origin={"train": str(folder / "..".join(dict.fromkeys([layout.train_files[0], layout.train_files[-1]]))),
                "test": str(folder / layout.test_file)},
        mean=layout.mean,
        std=layout.std,
        augment=Augment(crop_pad=4, flip=True),
    )


@register_source(
    "cifar10", "CIFAR-10 python pickles (cifar-10-batches-py/ or its parent in data.root)"
)
def read_cifar10(cfg: DataConfig) -> Dataset:
    return read_cifar(cfg, CIFAR10)


@register_source(
    "cifar100", "CIFAR-100 python pickles (cifar-100-python/ or its parent in data.root)"
)
def read_cifar100(cfg: DataConfig) -> Dataset:
    return read_cifar(cfg, CIFAR100)


# --------------------------------------------------------------------------- synthetic


def synthetic_images(patterns: np.ndarray, per_class: int, rs: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` noisy copies of each class pattern (K, C, S, S) in [0, 1], as uint8 images."""
    labels = np.repeat(np.arange(patterns.shape[0]), per_class)
    noise = rs.normal(0.0, 0.15, size=(labels.size, *patterns.shape[1:]))
    images = np.clip(patterns[labels] + noise, 0.0, 1.0)
    return np.rint(images * 255.0).astype(np.uint8), labels


@register_source(
    "synthetic", "seeded random class patterns plus noise (sizes from data.synthetic), for tests and demos"
)
def read_synthetic(cfg: DataConfig) -> Dataset:
    s = cfg.synthetic
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
