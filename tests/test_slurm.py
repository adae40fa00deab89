"""--executor slurm against a real SLURM (issue 24): `.ci/run` starts a single-node cluster on
127.0.0.1 (`bash .ci/slurm start`, its config in its own directory: SLURM_CONF) and sets
CILKIT_REQUIRE_SLURM=1, so that there the tests run or fail; elsewhere, without a reachable
scheduler, they skip (CILKIT_SLURM_PARTITION: the partition to submit to, default debug). The
tests of `.ci/slurm` itself (issue 40 item 5: it leaves daemons it did not start alone) and of
the squeue watcher run everywhere, on stand-in processes and commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import strip_timings, tiny_dict

from cilkit.cli import main


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip().rstrip("*") in ("idle", "mix", "alloc") for s in out.stdout.split())


@pytest.fixture
def slurm():
    required = os.environ.get("CILKIT_REQUIRE_SLURM") == "1"
    try:
        import submitit  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("CILKIT_REQUIRE_SLURM=1 but submitit is not installed")
        pytest.skip("submitit is not installed")
    if not _slurm_up():
        if required:
            pytest.fail("CILKIT_REQUIRE_SLURM=1 but no SLURM node is up (bash .ci/slurm start)")
        pytest.skip("no SLURM cluster here")


PARTITION = os.environ.get("CILKIT_SLURM_PARTITION", "debug")
SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "slurm"


def _results(root, methods, runs) -> dict[str, dict]:
    return {f"{m}/run_{k}": strip_timings(json.loads((root / m / f"run_{k}" / "results.json").read_text()))
            for m in methods for k in range(runs)}


@pytest.mark.slow  # several cluster jobs
def test_a_sweep_on_slurm_gives_the_local_numbers_and_compare_reads_it(tmp_path, slurm, capfd):
    # milestones past the last epoch: a warning in every job, which the parent forwards (issue 40 item 2)
    data = tiny_dict(tmp_path) | {"threads": 1, "runs": 2, "state0_cache": None,
                                  "scenario": {"initial": 4, "increment": 3, "states": 2}}
    data["train"] = {**data["train"], "schedule": {"type": "multistep", "milestones": [50]}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    common = ["run", str(config), "--methods", "finetune,icarl"]
    assert main(common + ["--out", str(tmp_path / "local")]) == 0
    capfd.readouterr()
    assert main(common + ["--out", str(tmp_path / "cluster"), "--executor", "slurm", "--jobs", "4",
                          "--slurm-partition", PARTITION, "--slurm-cpus-per-job", "1", "--slurm-time", "20"]) == 0
    printed, errors = capfd.readouterr()  # sacct's own stderr too, not only Python's
    assert printed.count("SLURM job") >= 4  # each run was its own cluster job
    cluster = tmp_path / "cluster"
    parent_log = (cluster / "run.log").read_text().splitlines()
    for m in ("finetune", "icarl"):
        for k in range(2):
            own = [line for line in (cluster / m / f"run_{k}" / "run.log").read_text().splitlines() if "warning:" in line]
            assert own[0] == f"[{m}] warning: config key 'train.schedule.milestones': [50] at or past the last epoch " \
                             "(train.epochs 2) never lower the lr in every state"  # and any stalled fit's
            forwarded = [line.replace(f"[{m}]", f"[{m}/run_{k}, seed {3 + k}]", 1) for line in own]
            assert [line for line in printed.splitlines() if line.startswith(f"[{m}/run_{k}, ")] == forwarded
            assert [line for line in parent_log if line.startswith(f"[{m}/run_{k}, ")] == forwarded
    # no accounting here: one line says so, instead of sacct's and submitit's complaints at every poll
    ours = [line for line in printed.splitlines() if line.startswith("[jobs] SLURM accounting is off here")]
    assert len(ours) <= 1  # none where the cluster keeps accounting
    others = [line for line in (printed + errors).splitlines() if line not in ours]
    assert not [line for line in others if "Bypassing sacct error" in line or "accounting storage is disabled" in line]
    assert _results(cluster, ["finetune", "icarl"], 2) == _results(tmp_path / "local", ["finetune", "icarl"], 2)
    assert (cluster / "slurm").is_dir() and (cluster / "summary.json").is_file()
    assert main(["compare", str(cluster), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "finetune" in table and "icarl" in table


def test_a_refused_submission_is_one_line(tmp_path, slurm, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path) | {"threads": 1}))
    assert main(["run", str(config), "--out", str(tmp_path / "r"), "--executor", "slurm",
                 "--slurm-partition", "no-such-partition"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]  # sbatch says its own too
    assert len(ours) == 1 and "submitting the jobs failed" in ours[0] and "no-such-partition" in ours[0]
    assert not (tmp_path / "r" / "results.json").exists()



def test_the_test_cluster_keeps_its_config_in_its_own_directory(slurm):
    # issue 40 item 5: .ci/slurm writes no /etc/slurm/slurm.conf; the cluster runs on the config of its directory
    if os.environ.get("CILKIT_SLURM_USE_RUNNING") == "1":
        pytest.skip("the tests run on a cluster .ci/slurm did not start")
    ours = subprocess.run(["bash", str(SCRIPT), "conf"], capture_output=True, text=True, check=True).stdout.strip()
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert any(line.split() == ["SLURM_CONF", "=", ours] for line in shown.splitlines())
    assert not ours.startswith("/etc/")


# ----- .ci/slurm on stand-in daemons (no SLURM needed) ---------------------------------------
def _stand_in(tmp_path, name: str, *args: str) -> subprocess.Popen:
    """A process named ``name`` (a script of that name: its comm) whose command line holds ``args``."""
    script = tmp_path / "bin" / name
    script.parent.mkdir(exist_ok=True)
    script.write_text("#!/bin/bash\nwhile :; do sleep 0.2; done\n")
    script.chmod(0o755)
    proc = subprocess.Popen([str(script), *args])
    for _ in range(50):  # until exec has given it its name
        if Path(f"/proc/{proc.pid}/comm").read_text().strip() == name:
            return proc
        time.sleep(0.05)
    raise AssertionError(f"{name} did not start")


def _ci_slurm(command: str, cluster_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CILKIT_SLURM_USE_RUNNING"} | {"CILKIT_SLURM_DIR": str(cluster_dir)}
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def stand_ins(tmp_path):
    if not Path("/proc/self/comm").exists():
        pytest.skip("needs /proc")
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        procs.append(_stand_in(tmp_path, name, *args))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_ci_slurm_refuses_to_start_beside_a_slurmctld_it_did_not_start(tmp_path, stand_ins):
    foreign = stand_ins("slurmctld")
    cluster = tmp_path / "cluster"
    out = _ci_slurm("start", cluster)
    assert out.returncode != 0
    assert f"slurmctld {foreign.pid}" in out.stderr and "CILKIT_SLURM_USE_RUNNING=1" in out.stderr
    assert not (cluster / "slurm.conf").exists()  # nothing written, nothing started
    assert _ci_slurm("stop", cluster).returncode == 0
    assert foreign.poll() is None  # never stopped by name


def test_ci_slurm_stops_only_the_daemons_it_started_by_their_pid(tmp_path, stand_ins):
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    ours = stand_ins("slurmd", "-f", f"{cluster}/slurm.conf")
    foreign_d = stand_ins("slurmd", "-f", "/etc/slurm/slurm.conf")
    foreign_ctld = stand_ins("slurmctld")
    (cluster / "slurmd.pid").write_text(f"{ours.pid}\n")
    (cluster / "slurmctld.pid").write_text(f"{foreign_ctld.pid}\n")  # a pid reused since by another's daemon
    (cluster / "munged.pid").write_text(f"{foreign_d.pid}\n")
    assert _ci_slurm("stop", cluster).returncode == 0
    assert ours.wait(timeout=20) is not None
    assert foreign_d.poll() is None and foreign_ctld.poll() is None
    assert not list(cluster.glob("*.pid"))


# ----- the job states without accounting (no SLURM needed) -------------------------------------
def _fake_commands(tmp_path, monkeypatch, **scripts: str) -> None:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_no_accounting_is_one_line_and_states_come_from_squeue(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from cilkit.runs.slurm import GONE, accounting_off, squeue_watcher

    _fake_commands(tmp_path, monkeypatch, sacct="echo 'sacct: Slurm accounting storage is disabled' >&2; exit 1",
                   squeue="echo '7_0|RUNNING|vm'; echo '7_1|COMPLETED|vm'")
    assert accounting_off() == "Slurm accounting storage is disabled"
    watcher = squeue_watcher()
    for job_id in ("7_0", "7_1", "7_2"):
        watcher.register_job(job_id)
    assert not watcher.is_done("7_0", mode="force")
    assert watcher.is_done("7_1", mode="cache")
    assert watcher.get_state("7_2", mode="cache") == GONE and watcher.is_done("7_2", mode="cache")  # ended long ago
    (tmp_path / "answers").mkdir()
    _fake_commands(tmp_path / "answers", monkeypatch, sacct="exit 0")
    assert accounting_off() is None
