"""Atomic file writing: every file is written to a temporary name, then renamed."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the same folder, so the rename is atomic: a killed process
    leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _save(p: Path) -> None:
        p.write_text(text)

    return atomic_write(path, _save)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def _save(p: Path) -> None:
        p.write_bytes(data)

    return atomic_write(path, _save)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    def _save(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    return atomic_write(path, _save)


def write_torch(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def load_torch(path: str | os.PathLike) -> Any:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
