"""--executor slurm against a real SLURM (issue 24): `.ci/run` starts a single-node cluster on
127.0.0.1 (`bash .ci/slurm start`) and sets CILKIT_REQUIRE_SLURM=1, so that there the test runs
or fails; elsewhere, without a reachable scheduler, it skips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

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


def _results(root, methods, runs) -> dict[str, dict]:
    return {f"{m}/run_{k}": strip_timings(json.loads((root / m / f"run_{k}" / "results.json").read_text()))
            for m in methods for k in range(runs)}


def test_a_sweep_on_slurm_gives_the_local_numbers_and_compare_reads_it(tmp_path, slurm, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path) | {"threads": 1, "runs": 2, "state0_cache": None,
                                                            "scenario": {"initial": 4, "increment": 3, "states": 2}}))
    common = ["run", str(config), "--methods", "finetune,icarl"]
    assert main(common + ["--out", str(tmp_path / "local")]) == 0
    assert main(common + ["--out", str(tmp_path / "cluster"), "--executor", "slurm", "--jobs", "4",
                          "--slurm-partition", "debug", "--slurm-cpus-per-job", "1", "--slurm-time", "20"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("SLURM job") >= 4  # each run was its own cluster job
    cluster = tmp_path / "cluster"
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
