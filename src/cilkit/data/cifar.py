"""CIFAR-10 / CIFAR-100 from the python-version pickles (``cifar-10-batches-py``,
``cifar-100-python``): a restricted unpickler (no code runs from a file), every field checked
(type and range), one line naming the file and field for anything else."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cilkit.settings.config import DataConfig
from cilkit.data.base import Dataset
from cilkit.data.sources import _root_folder, _tensor_set
from cilkit.data.transforms import Augment
from cilkit.common.errors import UserError, reason
from cilkit.settings.registry import register_source


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


INT64 = np.iinfo(np.int64)  # labels: class ids 0.. as int64


def _integer_values(value: object) -> np.ndarray:
    """``value`` as an array with no value lost: arrays as they are, anything else through
    Python ints (``np.asarray`` would read [0, 2**63] as floats)."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    arr = np.array(value, dtype=object)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in arr.flat):
        raise ValueError("not all entries are integers")
    return arr


def _cifar_field(path: Path, obj: dict[str, object], key: str, lo: int, hi: int, dtype: type) -> np.ndarray:
    """``obj[key]`` as ``dtype``, every value an integer in lo..hi: a plain conversion raises
    OverflowError for a list and silently wraps an array (300 would become 44)."""
    try:
        arr = _integer_values(obj[key])
    except (TypeError, ValueError, OverflowError) as e:
        raise UserError(f"'{path}': '{key}' is unreadable ({reason(e)})") from None
    if arr.size == 0:
        return arr.astype(dtype)
    if arr.dtype.kind not in "iuO":
        raise UserError(f"'{path}': '{key}' must hold integers {lo}..{hi}, found {arr.dtype} values")
    for v in (int(arr.min()), int(arr.max())):
        if not lo <= v <= hi:
            raise UserError(f"'{path}': '{key}' holds the value {v}, outside {lo}..{hi}")
    return arr.astype(dtype)


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path, ("data", label_key))
    data = _cifar_field(path, obj, "data", 0, 255, np.uint8)
    labels = _cifar_field(path, obj, label_key, 0, int(INT64.max), np.int64)
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
