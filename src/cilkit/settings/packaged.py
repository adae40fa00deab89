"""The configs shipped inside the package (``cilkit/configs/*.yaml``, package data): the
embedded quickstart, ``cilkit run NAME`` and ``cilkit configs``.

They are read through :mod:`importlib.resources`, so that they are there after any install
(``pip install .`` copies no repository folder; the top-level ``configs`` of a checkout is a
link to this one folder). This module imports nothing of cilkit but :mod:`cilkit.common.errors`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from cilkit.common.errors import UserError, did_you_mean

_SUFFIX = ".yaml"
_opened = contextlib.ExitStack()  # files of a zipped install, extracted while the process lives
atexit.register(_opened.close)


def _folder() -> Traversable:
    return resources.files("cilkit").joinpath("configs")


def packaged_names() -> list[str]:
    """The names of the packaged configs (file names without ``.yaml``), sorted."""
    return sorted(p.name[: -len(_SUFFIX)] for p in _folder().iterdir() if p.is_file() and p.name.endswith(_SUFFIX))


def description(text: str, limit: int = 100) -> str:
    """A config's one line: the first sentence of its header comment (what the protocol is;
    the rest says where its settings come from), cut to ``limit`` characters."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    head = re.split(r"\.\s+(?=[A-Z])", " ".join(" ".join(lines).split()), maxsplit=1)[0].rstrip(".:")
    return head if len(head) <= limit else head[: limit - 1].rsplit(" ", 1)[0] + " …"


def packaged_configs() -> dict[str, str]:
    """``{name: one-line description}`` of every packaged config (``cilkit configs``)."""
    return {name: description(_folder().joinpath(name + _SUFFIX).read_text(encoding="utf-8"))
            for name in packaged_names()}


def quickstart_dict() -> dict[str, Any]:
    """The embedded default protocol (digits, 5 states of 2 classes, finetune vs icarl)."""
    return yaml.safe_load(_folder().joinpath("quickstart.yaml").read_text(encoding="utf-8"))


def resolve_config(value: str | os.PathLike) -> Path:
    """Where a ``cilkit run CONFIG`` argument points: the file (or folder) as given when it
    exists, else the packaged config of that bare name (``fashion-mnist`` or
    ``fashion-mnist.yaml``: no folder part). A bare name that is neither is one line listing
    the packaged names; a missing path with a folder is left to the reader to report."""
    path = Path(value)
    if path.exists() or len(path.parts) != 1:
        return path
    name = path.name[: -len(_SUFFIX)] if path.name.endswith(_SUFFIX) else path.name
    names = packaged_names()
    if name in names:
        return _opened.enter_context(resources.as_file(_folder().joinpath(name + _SUFFIX)))
    hint = did_you_mean(name, names)
    raise UserError(f"config file '{value}' not found, nor a packaged config '{name}'" + (f": {hint}" if hint else "")
                    + f" (packaged: {', '.join(names)}; cilkit configs describes them)")
