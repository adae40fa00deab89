"""The layout of a run directory, in one place.

Every path of a run directory is built here; the runner, the statistics step, the offline
calibration, the report and the methods ask a :class:`RunLayout` instead of joining strings::

    config.yaml  results.json  summary.json  run.log  history.jsonl  tb/
    scores/state_XX.npz   stats/state_XX.json   memory/state_XX.json   <method>/state_XX.json
    checkpoints/state_XX.pt   report/   calibrated/<rectifier>/

``XX`` is the 0-based state index, two digits at least (``state_100`` after ``state_99``:
:meth:`RunLayout.checkpoints` sorts by the number, not the name). Reading a run's files goes
through the readers below, which turn a missing, foreign or newer-version file into one
:class:`~cilkit.errors.UserError` naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cilkit import distributed
from cilkit.errors import UserError
from cilkit.io import make_dir

RESULTS_VERSION = 2  # of results.json; a newer one is refused by read_results
# 2: a method's own results of a state sit under its name (states[b]["lucir"], ["active"] ...)

_STATE_FILE = re.compile(r"state_(\d+)\.pt")
_RUN_KEYS = ("state_ends", "class_order")
_STATE_KEYS = ("state", "classes_seen", "new_classes", "top1", "top1_old", "top1_new", "new_class_share")


class RunLayout:
    """The files of one run directory (``root``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def run_log(self) -> Path:
        """Every line the run printed (:mod:`cilkit.runlog`)."""
        return self.root / "run.log"

    @property
    def history(self) -> Path:
        """Per-epoch and per-state training record (:mod:`cilkit.run.history`)."""
        return self.root / "history.jsonl"

    @property
    def tb(self) -> Path:
        """TensorBoard event files (``log.tensorboard``, :mod:`cilkit.run.tensorboard`)."""
        return self.root / "tb"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    def scores(self, b: int) -> Path:
        return self.root / "scores" / f"state_{b:02d}.npz"

    def stats(self, b: int) -> Path:
        return self.root / "stats" / f"state_{b:02d}.json"

    def memory(self, b: int) -> Path:
        return self.root / "memory" / f"state_{b:02d}.json"

    def method_file(self, method: str, b: int) -> Path:
        """A method's own record of state ``b`` (``StateRecord.files``): BiC's validation images
        and hold-outs (``bic/``), active IL's annotation cycles (``active/``) ..."""
        return self.root / method / f"state_{b:02d}.json"

    def checkpoint(self, b: int) -> Path:
        return self.checkpoint_dir / f"state_{b:02d}.pt"

    def calibrated(self, rectifier: str) -> Path:
        return self.root / "calibrated" / rectifier

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(state, path)`` of every checkpoint, in state order."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := _STATE_FILE.fullmatch(p.name))]
        return sorted(found)


# ----- readers ---------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> Any:
    """A JSON file; missing or unreadable -> ``UserError`` naming it and ``what`` it holds."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' not found ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' cannot be read ({what}): {e}") from None


def read_results(path: Path) -> dict[str, Any]:
    """A run's results.json, checked: a foreign file, one missing a key the report needs, one
    whose lists and objects are of another kind (:func:`_check_shapes`), or one written by a
    newer cilkit (``version`` above :data:`RESULTS_VERSION`) is refused, naming the file."""
    data = read_json(path, "not a cilkit run directory")
    if not isinstance(data, dict) or not isinstance(data.get("states"), list):
        raise UserError(f"'{path}' is not a cilkit results file (no 'states' list)")
    version = data.get("version", 1)
    if not isinstance(version, int) or version > RESULTS_VERSION:
        raise UserError(f"'{path}' was written by a newer cilkit (results version {version}; this one "
                        f"reads up to {RESULTS_VERSION}): upgrade cilkit to read it")
    missing = [k for k in _RUN_KEYS if k not in data]
    if missing:
        raise UserError(f"'{path}' is not a cilkit results file: no '{missing[0]}'")
    _check_shapes(path, data)
    missing = [f"states[{b}].{k}" for b, s in enumerate(data["states"]) for k in _STATE_KEYS if k not in s]
    if missing:
        raise UserError(f"'{path}' is not a cilkit results file: no '{missing[0]}'")
    return data


_RUN_SHAPES: tuple[tuple[str, type, str], ...] = (
    ("state_ends", list, "a list"), ("class_order", list, "a list"),
    ("calibration", dict, "an object"), ("provenance", dict, "an object"),
)


def _check_shapes(path: Path, data: dict[str, Any]) -> None:
    """Refuse a results.json whose containers are not what the report reads: ``states`` a list
    of objects, each one's ``variants`` an object of objects, ``state_ends`` and
    ``class_order`` lists, ``calibration`` and ``provenance`` (when there) objects."""
    def damaged(key: str, what: str) -> UserError:
        return UserError(f"'{path}' is damaged: '{key}' is not {what}")

    for key, kind, what in _RUN_SHAPES:
        if key in data and not isinstance(data[key], kind):
            raise damaged(key, what)
    for b, state in enumerate(data["states"]):
        if not isinstance(state, dict):
            raise damaged(f"states[{b}]", "an object")
        variants = state.get("variants", {})
        if not isinstance(variants, dict):
            raise damaged(f"states[{b}].variants", "an object")
        for name, figures in variants.items():
            if not isinstance(figures, dict):
                raise damaged(f"states[{b}].variants.{name}", "an object")


def read_scores(path: Path, *keys: str) -> list[np.ndarray]:
    """The named arrays of a stored ``scores/state_XX.npz`` (object arrays refused)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return [npz[k] for k in keys]
    except FileNotFoundError:
        raise UserError(f"'{path}' not found (the run's stored test scores)") from None
    except KeyError as e:
        raise UserError(f"'{path}' has no {e} array (not a cilkit scores file)") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"'{path}' cannot be read: {e.__class__.__name__}: {e}") from None


def read_stats(path: Path, b: int) -> dict[str, Any]:
    """A state's saved class statistics (``stats/state_XX.json``), with the keys the
    rectifiers read."""
    data = read_json(path, f"class statistics of state {b + 1}; runs made before cilkit saved "
                           "statistics cannot be rectified")
    needed = ("state", "n_old", "state_ends", "init_mean", "conf", "cur_mean", "train_counts")
    missing = [k for k in needed if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"'{path}' is not a cilkit statistics file: no '{missing[0]}'")
    return data


# ----- claiming a directory for a run -----------------------------------------------------------
LOCK_NAME = ".cilkit.lock"
# What cilkit writes into a run directory (anything else is the user's: never overwritten).
OWN_ENTRIES = frozenset({
    "config.yaml", "results.json", "summary.json", "run.log", "history.jsonl", ".cilkit.lock",
    "scores", "stats", "memory", "active", "bic", "checkpoints", "report", "calibrated", "tb",
})


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def foreign_entries(root: Path) -> list[str]:
    """Entries of ``root`` that cilkit did not write: not one of :data:`OWN_ENTRIES` nor a
    sub-run (a directory holding a config.yaml: a method or ``run_k`` of a comparison)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.name not in OWN_ENTRIES and not _is_run_dir(p) and not _is_method_dir(p))


def _is_method_dir(path: Path) -> bool:
    """A method's own records (:meth:`RunLayout.method_file`), a plugin method's included."""
    from cilkit.registry import METHODS

    return path.is_dir() and path.name in METHODS


def holds_run(root: Path) -> bool:
    return root.is_dir() and any(
        p.name != LOCK_NAME and (p.name in OWN_ENTRIES or _is_run_dir(p)) for p in root.iterdir()
    )


def check_target(root: Path, overwrite: bool) -> None:
    """Refuse to start a fresh run in ``root`` when it holds another run (unless
    ``overwrite``) or files cilkit did not write (always)."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--out '{root}' is a file, not a directory")
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(f"'{n}'" for n in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(f"--out '{root}' holds files that are not a cilkit run ({shown}): choose an empty "
                        "or new directory")
    if holds_run(root) and not overwrite:
        raise UserError(f"--out '{root}' holds a cilkit run: continue it with --resume {root}, or replace "
                        "it with --overwrite")


def clear_run(root: Path) -> None:
    """Remove a previous run's files from ``root`` (cilkit's own entries and sub-runs only;
    rank 0 only)."""
    if not distributed.is_main():
        return
    for p in list(root.iterdir()) if root.is_dir() else []:
        if p.name == LOCK_NAME:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name in OWN_ENTRIES:
            p.unlink()


class DirectoryLock:
    """An exclusive lock on a run directory for the lifetime of a run (``flock`` on
    ``.cilkit.lock`` inside it): a second run into the same directory fails at once."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._file: Any = None

    def __enter__(self) -> "DirectoryLock":
        if not distributed.is_main():  # rank 0 holds it for the run
            return self
        make_dir(self.path.parent)
        try:
            self._file = open(self.path, "a")
        except OSError as e:
            raise UserError(f"cannot write '{self.path}': {e.strerror or e}") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise UserError(f"'{self.path.parent}' is in use by another cilkit run (locked: {self.path})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is None:
            return
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()


def fresh_directory(base: Path) -> Path:
    """Create and return ``base``, or ``base-2``, ``base-3``, ... whichever is free first
    (``mkdir`` is atomic: two runs started together never pick the same one)."""
    make_dir(base.parent)
    k = 1
    while True:
        candidate = base if k == 1 else base.parent / f"{base.name}-{k}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            k += 1
        except OSError as e:
            raise UserError(f"cannot create directory '{candidate}': {e.strerror or e}") from None
