"""The layout of a run directory, in one place.

Every path of a run directory is built here; the runner, the statistics step, the offline
calibration, the report and the methods ask a :class:`RunLayout` instead of joining strings::

    config.yaml  results.json  summary.json  run.log  history.jsonl  tb/
    scores/state_XX.npz   stats/state_XX.json   memory/state_XX.json   <method>/state_XX.json
    checkpoints/state_XX.pt   report/   calibrated/<rectifier>/

``XX`` is the 0-based state index, two digits at least (``state_100`` after ``state_99``:
:meth:`RunLayout.checkpoints` sorts by the number, not the name). Reading a run's files goes
through :mod:`cilkit.rundir.readers`, which turn a missing, foreign or newer-version file into one
:class:`~cilkit.common.errors.UserError` naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any


from cilkit.common import distributed, locks
from cilkit.common.errors import UserError
from cilkit.common.io import make_dir

_STATE_FILE = re.compile(r"state_(\d+)\.pt")


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
        """Every line the run printed (:mod:`cilkit.common.runlog`)."""
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


# ----- claiming a directory for a run -----------------------------------------------------------
LOCK_NAME = ".cilkit.lock"
RUN_MARKER = ".cilkit-run"  # written first into every run directory: what makes it a run's
# What cilkit writes into a run directory (anything else is the user's: never overwritten).
OWN_ENTRIES = frozenset({
    "config.yaml", "results.json", "summary.json", "run.log", "history.jsonl", LOCK_NAME, RUN_MARKER,
    "scores", "stats", "memory", "active", "bic", "checkpoints", "report", "calibrated", "tb",
    "slurm",  # the scheduler's job files and logs of --executor slurm (cilkit.runs.slurm)
    "wandb",  # wandb's own folder of log.wandb: true (cilkit.run.wandb_log), the run's id in it
})
STATE_ENTRIES = frozenset({"results.json", "summary.json", "history.jsonl", "scores", "stats", "memory",
                           "checkpoints", "report", "calibrated", "tb", "slurm"})
# ^ what a run's states wrote (a fresh start over a run clears them; config.yaml, run.log, the
#   lock and the marker stay)
_SUB_RUN = re.compile(r"run_\d+")


def is_run_dir(path: Path) -> bool:
    """A directory cilkit made for a run: it holds the run marker (written first), or, for runs
    of cilkit 0.1.0, a config.yaml beside results.json or checkpoints/ (a config.yaml alone is
    the user's)."""
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / RUN_MARKER).is_file():
        return True
    return (path / "config.yaml").is_file() and ((path / "results.json").is_file() or
                                                 (path / "checkpoints").is_dir())


def _is_method_dir(path: Path) -> bool:
    """A method's own records (:meth:`RunLayout.method_file`), a plugin method's included."""
    from cilkit.settings.registry import METHODS

    return path.is_dir() and not path.is_symlink() and path.name in METHODS


def _leftover(p: Path) -> bool:
    """What a start that failed before writing its config leaves: the lock, the marker, an empty
    run.log; a directory holding nothing else may be taken."""
    return p.name in (LOCK_NAME, RUN_MARKER) or (p.name == "run.log" and p.is_file() and p.stat().st_size == 0)


def _entries(root: Path) -> list[Path]:
    return sorted(root.iterdir()) if root.is_dir() else []


def foreign_entries(root: Path) -> list[str]:
    """Entries of ``root`` that cilkit did not write. In a run directory: anything but
    :data:`OWN_ENTRIES`, sub-runs (a method or ``run_k`` of a comparison) and a method's
    records; elsewhere, everything but a failed start's leftovers."""
    own = is_run_dir(root)
    return [p.name for p in _entries(root) if not _leftover(p) and not (
        own and (p.name in OWN_ENTRIES or is_run_dir(p) or _is_method_dir(p)))]


def holds_run(root: Path) -> bool:
    return is_run_dir(root) or any(is_run_dir(p) for p in _entries(root))


def enclosing_run(root: Path) -> Path | None:
    """The run directory ``root`` lies inside (at any depth), if any."""
    for parent in Path(os.path.abspath(root)).parents:
        if is_run_dir(parent):
            return parent
    return None


def outermost_run(root: str | os.PathLike) -> Path:
    """``root``, or the outermost run directory it lies in (a comparison's parent): what
    ``cilkit run --resume`` continues as a whole."""
    found = Path(root)
    for parent in Path(root).parents:
        if is_run_dir(parent):
            found = parent
    return found


def check_target(root: Path, overwrite: bool) -> None:
    """Refuse to start a fresh run in ``root`` when it holds another run (unless
    ``overwrite``), files cilkit did not write (always), or lies inside another run."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--out '{root}' is a file, not a directory")
    outer = enclosing_run(root)
    if outer is not None:
        raise UserError(f"--out '{root}' lies inside the cilkit run '{outer}': choose a directory outside it")
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(f"'{n}'" for n in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(f"--out '{root}' holds files that are not a cilkit run ({shown}): choose an empty "
                        "or new directory")
    if holds_run(root) and not overwrite:
        raise UserError(f"--out '{root}' holds a cilkit run: continue it with --resume {root}, or replace "
                        "it with --overwrite")


def mark_run(root: Path, config: dict[str, Any]) -> None:
    """Write the run marker (with the config the run starts from) into ``root`` (rank 0)."""
    if distributed.is_main():
        from cilkit.common.io import write_json

        write_json(root / RUN_MARKER, {"config": config})


def marked_config(root: Path) -> dict[str, Any] | None:
    """The config a run started from, as its marker recorded it (None for older runs)."""
    try:
        data = json.loads((root / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("config") if isinstance(data, dict) else None


def clear_run(root: Path, entries: frozenset[str] | None = None) -> None:
    """Remove a previous run's files from ``root``: its own entries and sub-runs (all of
    :data:`OWN_ENTRIES` but the lock, or just ``entries``), never a file cilkit did not write
    and never through a symlink (a link is removed, not what it points to). Everything is
    checked before anything is removed: a half-cleared run is never left. Rank 0 only."""
    if not distributed.is_main():
        return
    doomed = [p for p in _entries(root) if p.name != LOCK_NAME and (
        p.name in entries if entries is not None else (p.name in OWN_ENTRIES or is_run_dir(p) or _is_method_dir(p)))]
    for p in doomed:
        _check_removable(p)
    for p in doomed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _check_removable(path: Path) -> None:
    """Raise a UserError naming the first directory below ``path`` (links not followed) whose
    entries cannot be removed."""
    dirs = [path.parent] + ([Path(d) for d, _, _ in os.walk(path)] if path.is_dir() and not path.is_symlink() else [])
    for d in dirs:
        if not os.access(d, os.W_OK | os.X_OK):
            raise UserError(f"cannot remove the previous run's files: '{d}' is not writable (nothing was removed)")


class DirectoryLock:
    """An exclusive lock on a run directory for the lifetime of a run (``flock`` on
    ``.cilkit.lock`` inside it, removed when the run lets go: :mod:`cilkit.common.locks`): a second
    run into the same directory fails at once."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._file: Any = None

    def __enter__(self) -> "DirectoryLock":
        if not distributed.is_main():  # rank 0 holds it for the run
            return self
        make_dir(self.path.parent)
        try:
            self._file = locks.acquire(self.path, wait=False)
        except BlockingIOError:
            raise UserError(f"'{self.path.parent}' is in use by another cilkit run (locked: {self.path})") from None
        except OSError as e:
            raise UserError(f"cannot write '{self.path}': {e.strerror or e}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is None:
            return
        locks.release(self._file, self.path)
        self._file = None


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
