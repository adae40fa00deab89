"""How idle OpenMP threads wait (``OMP_WAIT_POLICY``), chosen by what shares the cores.

Spinning (``ACTIVE``) is faster for a run that has the cores alone: a Fashion-MNIST run
spends a third of its time in futex calls when its idle threads sleep (``PASSIVE``). Spinning
threads of processes that share cores steal each other's time, and runs slow down many times
over (RESULTS.md section 9). So a run spins only when nothing else of cilkit's shares its
cores (:func:`choose`):

- a policy set in the environment is kept;
- ``--jobs N`` (N > 1) and ``--executor slurm``: the parent and every job sleep (the parent
  reads its own command line; the jobs it starts get :data:`SHARED_ENV`);
- torchrun with more processes on the machine than cores: sleep;
- another cilkit run holds the machine (its marker, below): sleep;
- else spin.

libgomp reads the variable once, when torch loads it: :func:`apply` runs in ``cilkit/__init__``
before torch is imported, and the choice holds for the life of the process. A run started
alone keeps spinning when a second run starts beside it; the second one sleeps and its setup
line says that the first spins.

*Which runs hold the machine.* Every run holds a marker file in :func:`machine_dir` (a folder of
the machine's temporary directory, shared by its users) while it runs (:func:`holding`): a file
it created under a temporary name, locked (``flock``) and then renamed into place, so that a
marker is never seen unlocked while its run lives. The kernel releases the lock when the
process ends, however it ends, so a marker whose lock is free is a dead run's (removed by the
next reader that may). No process id is trusted: ids are reused, locks are not. The run
directory's own lock cannot tell: run directories are anywhere on disk.

This module imports nothing of cilkit and not torch (it runs before torch loads).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

POLICY_ENV = "OMP_WAIT_POLICY"
CHOSEN_ENV = "CILKIT_OMP_WAIT_POLICY"
# ^ the policy cilkit chose and put in OMP_WAIT_POLICY, so that a process this one starts (which
#   inherits both) tells cilkit's choice from the user's and chooses again for itself
SHARED_ENV = "CILKIT_CORES_SHARED"
# ^ set by a process for the processes it starts that share the cores (``--jobs``): why they sleep
MACHINE_DIR_ENV = "CILKIT_MACHINE_DIR"
# ^ where the runs of this machine hold their markers (default: cilkit-runs in the temporary directory)
MARKER_SUFFIX = ".run"


@dataclass(frozen=True)
class Holder:
    """Another cilkit run that holds the machine: its process id, its wait policy, and the
    group of processes it belongs to (one torchrun job's ranks share a group)."""

    pid: int
    policy: str
    group: str = ""


@dataclass(frozen=True)
class WaitPolicy:
    """The chosen ``OMP_WAIT_POLICY`` (``ACTIVE``/``PASSIVE``, or what the user set) and why."""

    policy: str
    reason: str
    chosen: bool = True  # False: set by the user, or torch loaded before cilkit chose

    def describe(self) -> str:
        """For the setup line: ``idle threads spin (OMP_WAIT_POLICY=ACTIVE: ...)``."""
        how = {"ACTIVE": "idle threads spin", "PASSIVE": "idle threads sleep"}.get(self.policy.upper(),
                                                                                  "idle threads")
        return f"{how} (OMP_WAIT_POLICY={self.policy or 'unset'}: {self.reason})"


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def jobs_in_argv(argv: Sequence[str]) -> str | None:
    """Why the command line ``argv`` starts processes that share the cores (``--jobs N`` with
    N > 1, ``--executor slurm``: its jobs may land on this machine), else None."""
    args = list(argv)
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--jobs=") else args[i + 1] if a == "--jobs" and i + 1 < len(args) else None
        if value is not None and value.isdigit() and int(value) > 1:
            return f"--jobs {value}: the jobs share the cores"
        if a in ("--executor=slurm",) or (a == "--executor" and args[i + 1:i + 2] == ["slurm"]):
            return "--executor slurm: the jobs may share this machine's cores"
    return None


def _count(value: str | None) -> int:
    """A process count from the environment (1 when unset or not a number)."""
    return int(value) if value and value.strip().isdigit() else 1


def group_of(env: Mapping[str, str]) -> str:
    """The processes of one torchrun job share a group (their markers do not count for each other)."""
    if _count(env.get("WORLD_SIZE")) > 1:
        return "torchrun:" + ":".join(env.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    return ""


def choose(env: Mapping[str, str], ncores: int, argv: Sequence[str], holders: Sequence[Holder],
           torch_loaded: bool = False) -> WaitPolicy:
    """The wait policy of a process with environment ``env``, ``ncores`` cores and command line
    ``argv``, while ``holders`` (other cilkit runs) hold the machine; see the module's docstring."""
    current = env.get(POLICY_ENV, "")
    ours = bool(current) and current == env.get(CHOSEN_ENV)
    if torch_loaded:
        return WaitPolicy(current, "torch was imported before cilkit: the policy it started with", chosen=False)
    if current and not ours:
        return WaitPolicy(current, "set in the environment", chosen=False)
    if env.get(SHARED_ENV):
        return WaitPolicy("PASSIVE", env[SHARED_ENV])
    why = jobs_in_argv(argv)
    if why:
        return WaitPolicy("PASSIVE", why)
    group = group_of(env)
    if group:
        procs = _count(env.get("LOCAL_WORLD_SIZE"))
        if procs > ncores:
            return WaitPolicy("PASSIVE", f"torchrun: {procs} processes on {ncores} core{'s' if ncores != 1 else ''}")
    runs: dict[str | int, Holder] = {}
    for h in holders:
        if not (group and h.group == group):
            runs.setdefault(h.group or h.pid, h)  # a torchrun job's ranks: one run
    others = list(runs.values())
    if others:
        spinning = [h for h in others if h.policy.upper() == "ACTIVE"]
        pids = ", ".join(str(h.pid) for h in others[:3]) + (", ..." if len(others) > 3 else "")
        what = f"another cilkit run holds the machine (process {pids})" if len(others) == 1 else \
            f"{len(others)} other cilkit runs hold the machine (processes {pids})"
        if spinning:
            what += (f"; process {spinning[0].pid} spins and slows this run down: set OMP_WAIT_POLICY=PASSIVE for "
                     "runs side by side")
        return WaitPolicy("PASSIVE", what)
    alone = f"the run has the {ncores} core{'s' if ncores != 1 else ''} alone"
    if group:
        alone = f"torchrun: {_count(env.get('LOCAL_WORLD_SIZE'))} processes on {ncores} cores, no other cilkit run"
    return WaitPolicy("ACTIVE", alone)


# ----- the machine's markers -----------------------------------------------------------------
def machine_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(MACHINE_DIR_ENV) or Path(tempfile.gettempdir()) / "cilkit-runs")


def holders(directory: Path | None = None) -> list[Holder]:
    """The cilkit runs that hold the machine now (this process's own marker excluded). A marker
    whose lock is free is a dead run's: removed when this process may. Unreadable: none."""
    directory = machine_dir() if directory is None else directory
    found: list[Holder] = []
    try:
        names = sorted(p for p in os.listdir(directory) if p.endswith(MARKER_SUFFIX))
    except OSError:
        return found
    for name in names:
        path = directory / name
        try:
            f = open(path, "rb")
        except OSError:
            continue
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live run
                holder = _read_marker(f)
                if holder is not None and holder.pid != os.getpid():
                    found.append(holder)
                continue
            except OSError:
                continue
            with contextlib.suppress(OSError):  # a dead run's marker (or another user's we may not remove)
                os.unlink(path)
    return found


def _read_marker(f: IO[bytes]) -> Holder | None:
    try:
        data = json.loads(f.read().decode())
        return Holder(int(data["pid"]), str(data.get("policy", "")), str(data.get("group", "")))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def holding(policy: WaitPolicy | None = None, env: Mapping[str, str] | None = None) -> Iterator[Path | None]:
    """Hold a marker in :func:`machine_dir` while the block runs (the run holds the machine);
    yields its path, or None where the folder cannot be written (then nothing is held)."""
    env = os.environ if env is None else env
    policy = CHOSEN if policy is None else policy
    marker = _create_marker(machine_dir(env), policy.policy, group_of(env))
    try:
        yield None if marker is None else marker[1]
    finally:
        if marker is not None:
            f, path = marker
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still holding the lock: no reader takes it for a dead run's
            f.close()


def _create_marker(directory: Path, policy: str, group: str) -> tuple[IO[bytes], Path] | None:
    try:
        _make_shared_dir(directory)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.getpid()}-", suffix=".tmp", dir=directory)
    except OSError:
        return None
    f = os.fdopen(fd, "wb")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o644)  # readable by the other users' runs
        f.write(json.dumps({"pid": os.getpid(), "policy": policy, "group": group}).encode())
        f.flush()
        path = directory / (Path(tmp).name.lstrip(".")[:-len(".tmp")] + MARKER_SUFFIX)
        os.rename(tmp, path)  # seen only now, and locked
        return f, path
    except OSError:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None


def _make_shared_dir(directory: Path) -> None:
    """The markers' folder, writable by every user (sticky, as /tmp); a symlink is refused."""
    try:
        os.mkdir(directory)
        os.chmod(directory, 0o1777)
    except FileExistsError:
        pass
    if not stat.S_ISDIR(os.lstat(directory).st_mode):
        raise NotADirectoryError(str(directory))


# ----- at import ---------------------------------------------------------------------------------
CHOSEN = WaitPolicy("PASSIVE", "not chosen yet", chosen=False)


def apply() -> WaitPolicy:
    """Choose this process's policy and put it in the environment, before torch loads (called
    once, by ``cilkit/__init__``); kept in :data:`CHOSEN` for the setup line."""
    global CHOSEN
    torch_loaded = "torch" in sys.modules
    found = [] if torch_loaded or os.environ.get(POLICY_ENV, "") not in ("", os.environ.get(CHOSEN_ENV)) \
        else holders()
    CHOSEN = choose(os.environ, cores(), sys.argv[1:], found, torch_loaded)
    if CHOSEN.chosen:
        os.environ[POLICY_ENV] = CHOSEN.policy
        os.environ[CHOSEN_ENV] = CHOSEN.policy
    return CHOSEN


@contextlib.contextmanager
def shared_by_children(reason: str) -> Iterator[None]:
    """Processes started inside the block share the cores (``--jobs``): they sleep, saying ``reason``."""
    before = os.environ.get(SHARED_ENV)
    os.environ[SHARED_ENV] = reason
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SHARED_ENV, None)
        else:
            os.environ[SHARED_ENV] = before
