"""The processes of ``--jobs N`` and the jobs of ``--executor slurm`` when what runs them goes
away (issue 37 items 11, 13 and 17): a job whose parent was killed stops before its next state,
quietly and resumable; Ctrl-C leaves the clear line alone (no leaked-semaphore warning); a failed
SLURM job is reported with its cause and its log; a requeued SLURM job that had finished exits at
once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import strip_timings, tiny_dict
from test_slurm import PARTITION, slurm  # noqa: F401 (the fixture: the test cluster, or a skip)

from cilkit.cli import main
from cilkit.runs.workers import STOP_GRACE_S

# Two fine-tuning methods that, after training their first state, wait for a file to exist: the
# test kills or interrupts the parent while both jobs are there, in the middle of state 1.
HELD = '''
import os, time
from pathlib import Path
from cilkit.methods.finetune import Finetune
from cilkit.settings.registry import register_method

@register_method("held_a")
class HeldA(Finetune):
    """Fine-tuning that, after state 1 trained, says so (reached-<method>) and waits for the go file."""
    def after_state(self, ctx):
        super().after_state(ctx)
        flags = Path(os.environ["HELD_FLAGS"])
        if ctx.state.index == 0:
            (flags / f"reached-{ctx.config.method}").touch()
            deadline = time.monotonic() + 120
            while not (flags / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

register_method("held_b")(type("HeldB", (HeldA,), {}))
'''

METHODS = ("held_a", "held_b")


def _held_config(tmp_path: Path) -> Path:
    plugin = tmp_path / "held.py"
    plugin.write_text(HELD)
    cfg = tiny_dict(tmp_path) | {"threads": 1, "state0_cache": None, "plugins": [str(plugin)]}
    cfg["train"] = {**cfg["train"], "epochs": 1}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_parent(tmp_path: Path, config: Path, out: Path) -> tuple[subprocess.Popen, Path, Path]:
    """``cilkit run CONFIG --methods held_a,held_b --jobs 2`` in a session of its own (a terminal's
    Ctrl-C reaches its whole process group); its stdout and stderr files."""
    flags = tmp_path / "flags"
    flags.mkdir()
    stdout, stderr = tmp_path / "parent.out", tmp_path / "parent.err"
    env = os.environ | {"HELD_FLAGS": str(flags), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(stdout, "w") as o, open(stderr, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "cilkit", "run", str(config), "--methods", ",".join(METHODS),
                                 "--jobs", "2", "--out", str(out)], stdout=o, stderr=e, env=env,
                                start_new_session=True)
    return proc, stdout, stderr


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (the jobs, the resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _jobs_in_state_1(parent: subprocess.Popen, flags: Path) -> list[int]:
    """Wait until both held jobs of ``parent`` have trained state 1; the processes under it."""
    _wait_for(lambda: all((flags / f"reached-{m}").exists() for m in METHODS), 120, "both jobs in state 1")
    return _children(parent.pid)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that runs (a zombie, dead and not yet reaped, runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _results(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): strip_timings(json.loads(p.read_text())) for p in sorted(root.rglob("results.json"))}


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the processes off /proc")


@needs_proc
@pytest.mark.slow  # a cilkit process with two jobs of its own, then a resume and a cold run
def test_jobs_of_a_killed_parent_stop_at_the_next_state_quietly_and_resume(tmp_path):
    """issue 37 item 11: ``--jobs 2`` with the parent killed -9 while both jobs are in state 1:
    - no job process is left running (they stop before state 2 instead of running on as orphans),
    - no traceback anywhere (the parent's stdout/stderr, which the jobs share, and every run.log;
      before, each orphan finished its run and printed a BrokenPipeError traceback),
    - each job's run.log says why it stopped and how to continue; state 1 stays saved,
    - ``cilkit run --resume`` then gives the numbers of an uninterrupted run."""
    config, par, flags = _held_config(tmp_path), tmp_path / "par", tmp_path / "flags"
    parent, stdout, stderr = _start_parent(tmp_path, config, par)
    try:
        children = _jobs_in_state_1(parent, flags)
        assert len(children) >= 2  # the two jobs (and multiprocessing's resource tracker)
        parent.kill()
        parent.wait()
        (flags / "go").touch()
        _wait_for(lambda: not any(_running(pid) for pid in children), 60, "the orphaned jobs to stop")
    finally:
        if parent.poll() is None:
            parent.kill()
        (flags / "go").touch()
    printed = stdout.read_text() + stderr.read_text()
    assert "Traceback" not in printed and "BrokenPipeError" not in printed
    for m in METHODS:
        log = (par / m / "run.log").read_text()
        assert "Traceback" not in log
        assert (f"[{m}] the process that started this job (pid {parent.pid}) is gone: stopping before state 2/3; "
                f"the finished states are saved: continue with cilkit run --resume {par}") in log
        results = json.loads((par / m / "results.json").read_text())
        assert not results["complete"] and len(results["states"]) == 1
    os.environ["HELD_FLAGS"] = str(flags)  # the plugin's go file exists: nothing waits from here on
    try:
        assert main(["run", "--resume", str(par)]) == 0
        cold = tmp_path / "cold"
        assert main(["run", str(config), "--methods", ",".join(METHODS), "--out", str(cold)]) == 0
    finally:
        del os.environ["HELD_FLAGS"]
    assert len(_results(par)) == 2 and _results(par) == _results(cold)


@needs_proc
@pytest.mark.slow  # a cilkit process with two jobs of its own
def test_ctrl_c_under_jobs_prints_the_clear_line_alone(tmp_path):
    """issue 37 item 17: Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while
    two jobs train: the parent exits 130 with its one clear line, and after it nothing — no
    "leaked semaphore" warning of multiprocessing's resource tracker (before: tqdm's lock, a
    named semaphore each job made, was left behind by the jobs the parent terminated while they
    unwound) — and no KeyboardInterrupt traceback in the jobs' run.log (as a serial run); the
    jobs stop on the interrupt itself, not terminated after a wait."""
    config, par, flags = _held_config(tmp_path), tmp_path / "par", tmp_path / "flags"
    parent, stdout, stderr = _start_parent(tmp_path, config, par)
    try:
        children = _jobs_in_state_1(parent, flags)
        os.killpg(parent.pid, signal.SIGINT)
        t0 = time.monotonic()
        assert parent.wait(timeout=60) == 130
        assert time.monotonic() - t0 < STOP_GRACE_S  # the jobs stopped on the interrupt, none was left to terminate
        _wait_for(lambda: not any(_running(pid) for pid in children), 60, "the jobs and the resource tracker to end")
    finally:
        if parent.poll() is None:
            parent.kill()
        (flags / "go").touch()
    assert stderr.read_text().splitlines() == [
        f"interrupted: finished states are saved; continue with cilkit run --resume {par}"]
    assert "Traceback" not in stdout.read_text()
    for m in METHODS:
        assert "Traceback" not in (par / m / "run.log").read_text()


# ----- SLURM: a failed job's line, a requeued finished job ----------------------------------------
def _submitit_failure(trace: str, job_id: str = "12_0") -> str:
    """The text of submitit's FailedJobError for a job whose function raised (submitit 1.5's words)."""
    return (f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
            "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
            f"  - /runs/x/slurm/{job_id}_log.err\n  - /runs/x/slurm/{job_id}_log.out")


def _raised(make) -> str:
    """The traceback of what ``make()`` raises, as the job's submitit wrapper writes it."""
    import traceback

    try:
        make()
    except Exception:
        return traceback.format_exc()
    raise AssertionError("nothing raised")


def _value_error_with_a_cause_and_a_note() -> None:
    try:
        {}["lr"]
    except KeyError as e:
        error = ValueError("boom in state 2\n(second line)")
        error.add_note("the finished states are saved: after the fix, continue the run with cilkit run --resume /r")
        raise error from e


def _user_error() -> None:
    from cilkit.common.errors import UserError

    raise UserError("config key 'train.lr': inf is not a finite number")


def test_a_failed_slurm_jobs_line_names_its_cause_and_its_log():
    """issue 37 item 13: a failed SLURM job's line gives the job's exception line, as the local
    ``--jobs`` path prints it, and then its log (before: the log path alone, the last line of
    submitit's message):
    - an exception with a cause and a note: ``Type: first line`` of the last exception, not the note;
    - a UserError: its message alone;
    - a job SLURM ended without a result (out of memory, time limit): its state and the last
      line of its error stream."""
    from cilkit.runs.slurm import failure_line

    log = "/runs/x/slurm/12_0_log.err"
    assert failure_line(_submitit_failure(_raised(_value_error_with_a_cause_and_a_note)), "FailedJobError", log) == \
        f"ValueError: boom in state 2 (log: {log})"
    assert failure_line(_submitit_failure(_raised(_user_error)), "FailedJobError", log) == \
        f"config key 'train.lr': inf is not a finite number (log: {log})"
    no_result = ("Job 12_0 (task: 0) with path /runs/x/slurm/12_0_0_result.pkl\n"
                 "has not produced any output (state: OUT_OF_MEMORY)\nError stream produced:\n" + "-" * 40 + "\n"
                 "slurmstepd: error: Detected 1 oom_kill event in StepId=12.batch. Some of the step tasks have been "
                 "OOM Killed.\n")
    assert failure_line(no_result, "UncompletedJobError", log) == (
        "the job ended without a result (SLURM state OUT_OF_MEMORY): slurmstepd: error: Detected 1 oom_kill event in "
        f"StepId=12.batch. Some of the step tasks have been OOM Killed. (log: {log})")


def test_a_requeued_slurm_job_that_finished_exits_at_once_with_a_line(tmp_path):
    """issue 37 item 17: SLURM requeues a job after its last state (a quick requeue, or one that
    came as it finished): the new attempt finds the run finished, says so in one line (its
    run.log and SLURM output) and runs nothing — every other file of the run stays as it was
    (before: it resumed the finished run, read the data and rewrote its files)."""
    from cilkit.runs.jobs import plan
    from cilkit.runs.slurm import SlurmRun
    from helpers import snapshot, tiny_config

    config = tiny_config(tmp_path, "threads=1", "train.epochs=1", "scenario.states=2", state0_cache=None)
    job = plan(config, tmp_path / "run")[0]
    assert SlurmRun()(job) == str(job.run_dir)  # the first attempt runs it
    log = job.run_dir / "run.log"
    before, log_before = snapshot(job.run_dir), log.read_text()
    assert json.loads((job.run_dir / "results.json").read_text())["complete"]
    assert SlurmRun()(job) == str(job.run_dir)  # the requeued attempt
    assert log.read_text() == log_before + (f"[jobs] finetune: {job.run_dir} is finished already (every state done): "
                                            "this requeued SLURM job has nothing to run\n")
    after = snapshot(job.run_dir)
    assert {k: v for k, v in after.items() if k != "run.log"} == {k: v for k, v in before.items() if k != "run.log"}


FAILING = '''
from cilkit.methods.finetune import Finetune
from cilkit.settings.registry import register_method

@register_method("failing")
class Failing(Finetune):
    """Fine-tuning that fails as state 1 starts."""
    def before_state(self, ctx):
        raise ValueError("boom in state 1")
'''


@pytest.mark.slow  # a cluster job
def test_a_failed_slurm_job_is_reported_with_its_cause_and_log_on_a_real_cluster(tmp_path, slurm, capsys):
    """issue 37 item 13 on the test cluster (tests/test_slurm.py: skipped without one): the job's
    line, at the end and as it fails, names the exception the job raised and its log file, which
    holds the traceback."""
    import re

    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path) | {"threads": 1, "state0_cache": None, "method": "failing",
                                                            "plugins": [str(plugin)]}))
    par = tmp_path / "par"
    assert main(["run", str(config), "--out", str(par), "--executor", "slurm", "--slurm-partition", PARTITION,
                 "--slurm-cpus-per-job", "1", "--slurm-time", "20"]) == 1
    captured = capsys.readouterr()
    line = re.escape(f"ValueError: boom in state 1 (log: {par / 'slurm'}/") + r"(?P<job>\d+_0)_log\.err\)"
    at_end = re.fullmatch(re.escape(f"  {par}: ") + line, captured.err.splitlines()[1])
    assert at_end is not None, captured.err
    assert re.search(re.escape(f"[jobs] failing: FAILED ({par}): ") + line, captured.out) is not None
    assert "ValueError: boom in state 1" in (par / "slurm" / f"{at_end['job']}_log.err").read_text()
