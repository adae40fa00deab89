"""How idle OpenMP threads wait (cilkit.common.omp): spinning when a run has the cores alone,
sleeping when --jobs, torchrun past the cores or another cilkit run share them; the choice and
its reason on the setup line; the machine's run markers."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cilkit.common import omp
from cilkit.common.omp import CHOSEN_ENV, POLICY_ENV, SHARED_ENV, Holder, choose, jobs_in_argv
from helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent


# ----- the decision ----------------------------------------------------------------------------
def test_a_run_alone_spins():
    p = choose({}, 2, ["run", "configs/fashion-mnist.yaml"], [])
    assert (p.policy, p.chosen) == ("ACTIVE", True)
    assert "alone" in p.reason and "2 cores" in p.reason


def test_a_policy_set_in_the_environment_is_kept():
    for value in ("ACTIVE", "PASSIVE", "passive"):
        p = choose({POLICY_ENV: value}, 2, ["run", "--jobs", "2"], [Holder(1, "ACTIVE")])
        assert (p.policy, p.chosen) == (value, False)
        assert "set in the environment" in p.reason


def test_a_policy_cilkit_chose_for_the_parent_is_chosen_again():
    """A process started by cilkit inherits both variables: the choice is its own again."""
    env = {POLICY_ENV: "ACTIVE", CHOSEN_ENV: "ACTIVE"}
    assert choose(env, 2, [], [Holder(7, "PASSIVE")]).policy == "PASSIVE"
    assert choose(env, 2, [], []).policy == "ACTIVE"
    # the user's own setting that differs from cilkit's earlier choice is the user's
    assert choose({POLICY_ENV: "PASSIVE", CHOSEN_ENV: "ACTIVE"}, 2, [], []).chosen is False


@pytest.mark.parametrize("argv", [["run", "--jobs", "2"], ["run", "--jobs=3"], ["tune", "c.yaml", "--jobs", "4"],
                                  ["run", "--executor", "slurm"], ["run", "--executor=slurm"]])
def test_jobs_on_the_command_line_sleep(argv):
    p = choose({}, 2, argv, [])
    assert p.policy == "PASSIVE"
    assert "--jobs" in p.reason or "--executor slurm" in p.reason


@pytest.mark.parametrize("argv", [["run", "--jobs", "1"], ["run", "--jobs"], ["run", "--executor", "local"], []])
def test_one_job_on_the_command_line_spins(argv):
    assert jobs_in_argv(argv) is None
    assert choose({}, 2, argv, []).policy == "ACTIVE"


def test_a_job_started_by_jobs_sleeps():
    p = choose({SHARED_ENV: "one of --jobs 2 processes sharing the cores"}, 2, [], [])
    assert p.policy == "PASSIVE" and p.reason == "one of --jobs 2 processes sharing the cores"


def test_torchrun_past_the_cores_sleeps_and_within_them_spins():
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29500"}
    p = choose(env, 2, [], [])
    assert p.policy == "PASSIVE" and "4 processes on 2 cores" in p.reason
    p = choose({**env, "LOCAL_WORLD_SIZE": "2"}, 2, [], [])
    assert p.policy == "ACTIVE" and "torchrun" in p.reason


def test_another_run_on_the_machine_sleeps_and_one_that_spins_is_named():
    p = choose({}, 2, [], [Holder(1234, "PASSIVE")])
    assert p.policy == "PASSIVE" and "another cilkit run holds the machine (process 1234)" in p.reason
    p = choose({}, 2, [], [Holder(1234, "ACTIVE"), Holder(99, "PASSIVE")])
    assert "2 other cilkit runs" in p.reason
    assert "process 1234 spins" in p.reason and "OMP_WAIT_POLICY=PASSIVE" in p.reason


def test_the_other_ranks_of_the_same_torchrun_job_do_not_count():
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc", "MASTER_PORT": "1"}
    mine = omp.group_of(env)
    assert choose(env, 2, [], [Holder(5, "ACTIVE", mine)]).policy == "ACTIVE"
    assert choose(env, 2, [], [Holder(5, "ACTIVE", "torchrun:other")]).policy == "PASSIVE"


def test_torch_imported_first_is_reported_not_chosen():
    p = choose({}, 2, [], [], torch_loaded=True)
    assert p.chosen is False and "torch was imported before cilkit" in p.reason


def test_describe_says_what_idle_threads_do():
    assert omp.WaitPolicy("ACTIVE", "x").describe() == "idle threads spin (OMP_WAIT_POLICY=ACTIVE: x)"
    assert omp.WaitPolicy("PASSIVE", "y").describe() == "idle threads sleep (OMP_WAIT_POLICY=PASSIVE: y)"


# ----- the machine's markers ---------------------------------------------------------------------
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("omp", sys.argv[1])  # the module alone: no torch to load
omp = sys.modules["omp"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(omp)
with omp.holding(omp.WaitPolicy("ACTIVE", "test")) as path:
    print(path, flush=True)
    time.sleep(60)
"""


def _start_holder(env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, omp.__file__], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line and line != "None", "the holder could not write its marker"
    return proc, Path(line)


def _env(machine: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (POLICY_ENV, CHOSEN_ENV, SHARED_ENV)}
    return {**env, "CILKIT_MACHINE_DIR": str(machine), "PYTHONPATH": str(ROOT / "src"), **more}


def test_a_live_run_holds_the_machine_and_a_dead_one_leaves_no_holder(tmp_path):
    machine = tmp_path / "machine"
    proc, marker = _start_holder(_env(machine))
    try:
        assert marker.parent == machine and marker.exists()
        found = omp.holders(machine)
        assert [(h.pid, h.policy) for h in found] == [(proc.pid, "ACTIVE")]
    finally:
        proc.kill()  # no clean-up runs: the kernel drops the lock
        proc.wait()
    assert marker.exists()
    assert omp.holders(machine) == []
    assert not marker.exists()  # the dead run's marker is removed by the reader


def test_holding_removes_its_marker_and_ignores_its_own(tmp_path):
    machine = tmp_path / "machine"
    with omp.holding(omp.WaitPolicy("PASSIVE", "t"), {"CILKIT_MACHINE_DIR": str(machine)}) as path:
        assert path is not None and path.exists()
        assert omp.holders(machine) == []  # this process's own marker
    assert not path.exists()
    assert oct((machine.stat().st_mode) & 0o7777) == oct(0o1777)  # shared by the machine's users


def test_holding_without_a_writable_folder_holds_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with omp.holding(omp.WaitPolicy("PASSIVE", "t"), {"CILKIT_MACHINE_DIR": str(blocker / "sub")}) as path:
        assert path is None


def _chosen_in_a_fresh_process(env: dict[str, str], *argv: str) -> tuple[str, str]:
    code = ("import os, cilkit; from cilkit.common import omp; "
            "print(os.environ['OMP_WAIT_POLICY']); print(omp.CHOSEN.reason)")
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out[0], out[1]


def test_importing_cilkit_chooses_before_torch_loads(tmp_path):
    machine = tmp_path / "machine"
    assert _chosen_in_a_fresh_process(_env(machine))[0] == "ACTIVE"
    assert _chosen_in_a_fresh_process(_env(machine), "run", "--jobs", "2") == ("PASSIVE", "--jobs 2: the jobs share the cores")
    assert _chosen_in_a_fresh_process(_env(machine, OMP_WAIT_POLICY="PASSIVE"))[0] == "PASSIVE"
    proc, _ = _start_holder(_env(machine))
    try:
        policy, reason = _chosen_in_a_fresh_process(_env(machine))
    finally:
        proc.kill()
        proc.wait()
    assert policy == "PASSIVE" and f"process {proc.pid} spins" in reason


def test_shared_by_children_is_set_while_they_start_only(monkeypatch):
    monkeypatch.delenv(SHARED_ENV, raising=False)
    with omp.shared_by_children("why"):
        assert os.environ[SHARED_ENV] == "why"
    assert SHARED_ENV not in os.environ


# ----- in a run ----------------------------------------------------------------------------------
def test_the_setup_line_says_which_policy_and_why_and_the_run_holds_the_machine(tmp_path, monkeypatch):
    from cilkit.run.loop import Run

    monkeypatch.setattr(omp, "CHOSEN", omp.WaitPolicy("ACTIVE", "the run has the 2 cores alone"))
    run = Run(tiny_config(tmp_path, "scenario.states=2", "train.epochs=1"), tmp_path / "run", progress=False)
    assert "idle threads spin (OMP_WAIT_POLICY=ACTIVE: the run has the 2 cores alone)" in run.setup_line()
    seen: list[list[Holder]] = []
    real = run.run_state

    def state(b: int) -> None:
        seen.append(_holders_elsewhere(tmp_path / "machine"))
        real(b)

    monkeypatch.setattr(run, "run_state", state)
    run.execute()
    assert len(seen) == 2 and all([(h.pid, h.policy) for h in hs] == [(os.getpid(), "ACTIVE")] for hs in seen)
    assert _holders_elsewhere(tmp_path / "machine") == []  # and let go after


def _holders_elsewhere(machine: Path) -> list[Holder]:
    """The markers in ``machine`` held locked (by this process too: ``flock`` locks are per open
    file, so this process's own held marker cannot be locked again)."""
    found = []
    for path in sorted(machine.glob("*.run")) if machine.is_dir() else []:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                data = json.loads(f.read())
                found.append(Holder(data["pid"], data["policy"], data["group"]))
    return found


@pytest.mark.slow
def test_jobs_sleep_and_their_setup_line_says_why(tmp_path, monkeypatch):
    from cilkit.runs.execution import Execution
    from cilkit.runs.multirun import run_methods

    monkeypatch.delenv(POLICY_ENV)  # cilkit chooses for the jobs (conftest set it for the tests)
    monkeypatch.delenv(CHOSEN_ENV, raising=False)
    out = tmp_path / "par"
    run_methods(tiny_config(tmp_path, "method=[finetune,icarl]", "threads=1", "train.epochs=1", "scenario.states=2",
                            state0_cache=None), out, progress=False, execution=Execution(jobs=2))
    for method in ("finetune", "icarl"):
        log = (out / method / "run.log").read_text()
        assert "idle threads sleep (OMP_WAIT_POLICY=PASSIVE: one of --jobs 2 processes sharing the cores)" in log


def test_the_runs_thread_count_is_set_before_any_data_is_read(tmp_path, monkeypatch):
    """An OpenMP pool once wider than the run keeps its surplus threads, and spinning they would
    hold cores through the run: the count is set before the first parallel region (the data)."""
    from cilkit.run import setup

    events: list[tuple[str, int]] = []
    real_load = setup.load_dataset
    monkeypatch.setattr(setup.torch, "set_num_threads", lambda n: events.append(("threads", n)))
    monkeypatch.setattr(setup, "load_dataset", lambda cfg: events.append(("data", 0)) or real_load(cfg))
    setup.check_protocol(tiny_config(tmp_path, "threads=1"))
    assert events[0] == ("threads", 1) and ("data", 0) in events


def test_a_torchrun_job_on_the_machine_counts_once_and_a_bad_count_is_one():
    ranks = [Holder(10, "PASSIVE", "torchrun:x"), Holder(11, "PASSIVE", "torchrun:x")]
    assert "another cilkit run holds the machine (process 10)" in choose({}, 2, [], ranks).reason
    assert choose({"WORLD_SIZE": "two", "LOCAL_WORLD_SIZE": ""}, 2, [], []).policy == "ACTIVE"
