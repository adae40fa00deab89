"""The layout of a run directory, in one place.

Every path of a run directory is built here; the runner, the statistics step, the offline
calibration, the report and the methods ask a :class:`RunLayout` instead of joining strings::

    config.yaml  results.json  summary.json  run.log  history.jsonl  tb/  diverged.json
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
from typing import Any, ClassVar


from cilkit.common import distributed, locks
from cilkit.common.errors import UserError
from cilkit.common.io import make_dir, path_inside

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
    def diverged(self) -> Path:
        """Where a run whose training went non-finite says so (:class:`~cilkit.common.errors.RunDiverged`'s
        record, read by :func:`cilkit.rundir.readers.read_divergence`); such a run has no results.json."""
        return self.root / DIVERGED_NAME

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
DIVERGED_NAME = "diverged.json"  # instead of results.json: the run's training went non-finite
RUN_MARKER = ".cilkit-run"  # written first into every run directory: what makes it a run's
# What cilkit writes into a run directory (anything else is the user's: never overwritten).
OWN_ENTRIES = frozenset({
    "config.yaml", "results.json", "summary.json", "run.log", "history.jsonl", LOCK_NAME, RUN_MARKER, DIVERGED_NAME,
    "scores", "stats", "memory", "active", "bic", "checkpoints", "report", "calibrated", "tb",
    "slurm",  # the scheduler's job files and logs of --executor slurm (cilkit.runs.slurm)
    "wandb",  # wandb's own folder of log.wandb: true (cilkit.run.wandb_log), the run's id in it
})
STATE_ENTRIES = frozenset({"results.json", "summary.json", "history.jsonl", DIVERGED_NAME, "scores", "stats",
                           "memory", "checkpoints", "report", "calibrated", "tb", "slurm"})
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
    :data:`OWN_ENTRIES`, the sub-runs its marker lists (:func:`listed_sub_runs`) and a method's
    records (a run it does not list is foreign, even named after a method); elsewhere,
    everything but a failed start's leftovers."""
    if not is_run_dir(root):
        return [p.name for p in _entries(root) if not _leftover(p)]
    tops = {sub.relative_to(root).parts[0] for sub in listed_sub_runs(root)}
    return [p.name for p in _entries(root) if not _leftover(p) and not (
        p.name in OWN_ENTRIES or p.name in tops or (_is_method_dir(p) and not is_run_dir(p)))]


def sub_run_names(config: dict[str, Any]) -> list[str]:
    """The directories, relative to the run's own, of the sub-runs a run of ``config`` makes,
    laid out as :func:`cilkit.runs.jobs.plan` lays them out: several methods -> ``<method>``,
    ``runs: R > 1`` -> ``run_<k>`` below that (or below the run itself for one method)."""
    method, runs = config.get("method"), config.get("runs", 1)
    seeds = [f"run_{k}" for k in range(runs)] if isinstance(runs, int) and runs > 1 else []
    if isinstance(method, str):
        return seeds
    names: list[str] = []
    for name in method if isinstance(method, list) else []:
        names += [str(name)] + [f"{name}/{seed}" for seed in seeds]
    return names


def listed_sub_runs(root: Path) -> list[Path]:
    """The sub-runs (and their method folders) the run ``root`` made, as its marker lists them
    (``sub_runs``); for a marker without the list, as its config lays them out (for a run of
    cilkit 0.1.0 without a marker, its config.yaml's). Each entry read from the file is checked
    to lie inside ``root`` (:func:`cilkit.common.io.path_inside`)."""
    marker, names = root / RUN_MARKER, None
    data = _read_marker(marker)
    if isinstance(data, dict) and "sub_runs" in data:
        names, source = data["sub_runs"], marker
        if not isinstance(names, list):
            raise UserError(f"'{marker}': 'sub_runs' is not a list: the file was edited or is not cilkit's; restore it "
                            "or start afresh in a new directory")
    elif isinstance(data, dict) and isinstance(data.get("config"), dict):
        names, source = sub_run_names(data["config"]), marker
    else:
        config, source = _read_config_yaml(root / "config.yaml"), root / "config.yaml"
        names = sub_run_names(config) if isinstance(config, dict) else []
    checked = [path_inside(root, name, source, "the sub-run") for name in names]
    return [root / os.path.relpath(os.path.abspath(p), os.path.abspath(root)) for p in checked]


def _read_marker(marker: Path) -> Any:
    try:
        return json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _read_config_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def foreign_runs(root: Path, below: list[Path] | None = None) -> list[Path]:
    """Run directories below the run ``root`` (at any depth, links not followed; only below the
    entries ``below`` when given) that ``root`` did not make: not among the sub-runs its marker
    lists. A run moved in from elsewhere is one; removing ``root`` must never remove it."""
    listed = {os.path.normpath(p) for p in listed_sub_runs(root)}
    found: list[Path] = []
    for top in below if below is not None else _entries(root):
        if not top.is_dir() or top.is_symlink():
            continue
        for d, dirs, _ in os.walk(top):
            here = Path(d)
            if is_run_dir(here) and os.path.normpath(here) not in listed:
                found.append(here)
                dirs.clear()
            else:
                dirs.sort()
    return found


def _refuse_foreign_runs(root: Path, below: list[Path] | None, what: str) -> None:
    found = foreign_runs(root, below)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{what} '{root}' holds the cilkit run '{found[0]}'{more}, which the run in it did not make "
                        "(moved in?): cilkit removes only a run's own sub-runs; move it out first (nothing was removed)")


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
    ``overwrite``), files cilkit did not write or a run that the run in ``root`` did not make (a
    run moved in: always refused, never removed), lies inside another run, or is a symbolic link
    (never followed: a run's own directory is never a link)."""
    if root.is_symlink():
        raise UserError(f"--out '{root}' is a symbolic link (to '{os.readlink(root)}'): cilkit does not follow it "
                        "into a run directory (nothing was removed); give the directory itself")
    if root.exists() and not root.is_dir():
        raise UserError(f"--out '{root}' is a file, not a directory")
    outer = enclosing_run(root)
    if outer is not None:
        raise UserError(f"--out '{root}' lies inside the cilkit run '{outer}': choose a directory outside it")
    if is_run_dir(root):
        _refuse_foreign_runs(root, None, "--out")
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(f"'{n}'" for n in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(f"--out '{root}' holds files that are not a cilkit run ({shown}): choose an empty "
                        "or new directory")
    if holds_run(root) and not overwrite:
        raise UserError(f"--out '{root}' holds a cilkit run: continue it with --resume {root}, or replace "
                        "it with --overwrite")


def mark_run(root: Path, config: dict[str, Any]) -> None:
    """Write the run marker (with the config the run starts from and the sub-runs it makes,
    :func:`sub_run_names`: all that ``--overwrite`` may remove below it) into ``root`` (rank 0)."""
    if distributed.is_main():
        from cilkit.common.io import write_json

        write_json(root / RUN_MARKER, {"config": config, "sub_runs": sub_run_names(config)})


def marked_config(root: Path) -> dict[str, Any] | None:
    """The config a run started from, as its marker recorded it (None for older runs)."""
    try:
        data = json.loads((root / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("config") if isinstance(data, dict) else None


def clear_run(root: Path, entries: frozenset[str] | None = None) -> None:
    """Remove a previous run's files from ``root``: its own entries and the sub-runs its marker
    lists (all of :data:`OWN_ENTRIES` but the lock, or just ``entries``), never a file cilkit did
    not write, never a run it did not make (a run moved into it, at any depth: refused, see
    :func:`foreign_runs`) and never through a symlink (a link is removed, not what it points
    to). Everything is checked before anything is removed: a half-cleared run is never left.
    Rank 0 only."""
    if not distributed.is_main():
        return
    tops = {sub.relative_to(root).parts[0] for sub in listed_sub_runs(root)} if is_run_dir(root) else set()
    doomed = [p for p in _entries(root) if p.name != LOCK_NAME and (
        p.name in entries if entries is not None else (p.name in OWN_ENTRIES or p.name in tops or _is_method_dir(p)))]
    _refuse_foreign_runs(root, doomed, "the run directory")
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
    run into the same directory fails at once, with ``busy`` (a line naming the directory and
    the lock file) when given. A lock taken ``reentrant`` is joined by the locks this process
    takes on the same directory while it holds it: ``cilkit run --resume`` holds the run's lock
    before it reads anything of the run, and the run it continues takes it again. (Any other
    lock refuses a second holder, in this process too.)"""

    _held: ClassVar[dict[str, int]] = {}  # the reentrant locks this process holds -> how many holders

    def __init__(self, root: Path, busy: str | None = None, reentrant: bool = False) -> None:
        self.path = Path(root) / LOCK_NAME
        self.busy = busy or f"'{self.path.parent}' is in use by another cilkit run (locked: {self.path})"
        self.reentrant = reentrant
        self._file: Any = None
        self._key: str | None = None

    def __enter__(self) -> "DirectoryLock":
        if not distributed.is_main():  # rank 0 holds it for the run
            return self
        make_dir(self.path.parent)
        key = os.path.realpath(self.path)
        if key in DirectoryLock._held:
            DirectoryLock._held[key] += 1
            self._key = key
            return self
        try:
            self._file = locks.acquire(self.path, wait=False)
        except BlockingIOError:
            raise UserError(self.busy) from None
        except OSError as e:
            raise UserError(f"cannot write '{self.path}': {e.strerror or e}") from None
        if self.reentrant:
            DirectoryLock._held[key] = 1
            self._key = key
        return self

    def __exit__(self, *exc: object) -> None:
        if self._key is not None:
            DirectoryLock._held[self._key] -= 1
            if DirectoryLock._held[self._key] > 0:  # joined: the first holder lets go
                self._key = None
                return
            del DirectoryLock._held[self._key]
            self._key = None
        if self._file is not None:
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
