"""Atomic file writing: every file is written to a temporary name, then renamed."""

from __future__ import annotations

import io as _bytes_io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cilkit.common import distributed
from cilkit.common.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the same folder, so the rename is atomic: a killed process
    leaves either the old file or the new one, never half of one.
    A file-system failure (read-only folder, full disk, no permission) is a ``UserError``
    naming the path and the cause; the old file, if any, is left as it was. Under torchrun only
    rank 0 writes (:mod:`cilkit.common.distributed`): elsewhere this does nothing.
    """
    path = Path(path)
    if not distributed.is_main():
        return path
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    except OSError as e:
        _remove(tmp_path)
        raise UserError(f"cannot write '{path}': {e.strerror or e}") from None
    except BaseException:
        _remove(tmp_path)
        raise
    return path


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p`` (rank 0 only); a file-system failure is a ``UserError`` naming the path and the cause."""
    path = Path(path)
    if not distributed.is_main():
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory '{path}': {e.strerror or e}") from None
    return path


def path_inside(owner: str | os.PathLike, value: object, source: str | os.PathLike, what: str) -> Path:
    """A path read from a file (``source``: a journal, a marker) that names something inside the
    directory that owns the file (``owner``): ``owner / value`` resolved (``..`` folded, links
    followed) must lie strictly inside ``owner`` (resolved too). Returns ``owner / value``. A
    value that is not a path, or that leads outside (``../x``, an absolute path elsewhere, a link
    out), is one ``UserError`` naming the file, ``what`` and the value: cilkit never reads, runs
    into or removes what a file it did not check points at."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise UserError(f"'{source}': {what} is {value!r}, not a path: the file was edited or is not cilkit's; "
                        "restore it or start afresh in a new directory")
    home = Path(owner).resolve()
    target = (home / value).resolve()  # an absolute value replaces ``home``
    if home not in target.parents:
        raise UserError(f"'{source}': {what} '{value}' leads outside '{owner}', the directory that holds the file: "
                        "the file was edited or is not cilkit's; restore it or start afresh in a new directory")
    return Path(owner) / value  # the path as the file gives it (what was checked is where it leads)


def _remove(tmp_path: Path | None) -> None:
    if tmp_path is not None:
        try:
            tmp_path.unlink(missing_ok=True)
        except OSError:
            pass


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
    """``torch.save`` into memory first, so that a full disk is an ``OSError`` of the write
    (torch's own file writer reports it as an opaque stream error)."""
    buffer = _bytes_io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())


def load_torch(path: str | os.PathLike) -> Any:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
