"""Data-parallel runs under torchrun on CPU (gloo): two processes on one machine, two
single-process "nodes" on 127.0.0.1, a rank that dies and the resume after it.

Every run here is a real ``torchrun ... -m cilkit run`` in subprocesses, on the digits
quickstart with 2 epochs per state (12 for the comparison with one process) and 1 thread per
process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cilkit.common.distributed import shard_bounds
from helpers import strip_timings

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this PyTorch build has no gloo backend")

METHODS = ["finetune", "icarl", "bic", "lucir", "il2m", "active", "foster", "memo"]  # der: tests/test_der.py
COMMON = ["--set", "device=cpu", "--set", "threads=1", "--set", "state0_cache=null", "--set", "train.sync_bn=true"]
QUICK = [*COMMON, "--set", "train.epochs=2", "--set", "lucir.cbf=true", "--set", "lucir.cbf_epochs=2",
         "--set", "foster.compression_epochs=2"]


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ("--standalone",),
             env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc_per_node={nproc}",
           "-m", "cilkit", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def same_numbers(a: Path, b: Path) -> None:
    ra, rb = strip_timings(results(a)), strip_timings(results(b))
    ra.pop("method"), rb.pop("method")
    assert ra == rb
    for f in sorted((a / "scores").iterdir()):
        with np.load(f) as x, np.load(b / "scores" / f.name) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files), f.name


def exit_marker_env(folder: Path) -> dict[str, str]:
    """An environment whose workers register an atexit handler (through sitecustomize) that
    writes ``atexit-rank<R>`` into ``folder``: what a user's own logger at exit would do."""
    site = folder / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import atexit, os, pathlib
        if "RANK" in os.environ:
            atexit.register(pathlib.Path({str(folder)!r}, "atexit-rank" + os.environ["RANK"]).write_text, "ran")
    """))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def all_methods(tmp_path_factory) -> Path:
    """Every method of the quickstart in one 2-process run (sync_bn on)."""
    out = tmp_path_factory.mktemp("ddp") / "all"
    done = torchrun("--out", str(out), "--methods", ",".join(METHODS), *QUICK, env=exit_marker_env(out.parent))
    assert done.returncode == 0, done.stderr[-3000:]
    (out.parent / "stdout.txt").write_text(done.stdout)
    return out


@pytest.mark.slow
def test_every_method_completes_one_run_directory_written_by_rank_0(all_methods):
    for m in METHODS:
        r = results(all_methods / m)
        assert r["complete"] and len(r["states"]) == 5, m
        assert r["provenance"]["ranks"] == 2 and r["provenance"]["backend"] == "gloo"
    assert (all_methods / "report" / "table.md").is_file()
    # one process printed and logged: every state line once, the table once
    log = (all_methods / "run.log").read_text().splitlines()
    assert sum(line.startswith("[finetune] state 5:") for line in log) == 1
    printed = (all_methods.parent / "stdout.txt").read_text()
    assert printed.count("| method |") == 1 and printed.count("[lucir] state 3:") == 1
    assert not [p for p in all_methods.rglob("*.tmp")]


def test_every_rank_leaves_through_its_atexit_handlers(all_methods):
    # the workers skip the interpreter's teardown (gloo aborts there now and then) but not atexit
    assert [(all_methods.parent / f"atexit-rank{r}").read_text() for r in (0, 1)] == ["ran", "ran"]


@pytest.mark.slow
def test_two_identical_distributed_runs_give_identical_results(all_methods, tmp_path):
    again = tmp_path / "again"
    done = torchrun("--out", str(again), "--methods", "finetune,lucir", *QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    for m in ("finetune", "lucir"):
        same_numbers(all_methods / m, again / m)


@pytest.mark.slow
def test_two_nodes_on_localhost_give_the_two_process_results(all_methods, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}",
                          "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                          "-m", "cilkit", "run", "--out", str(out), "--set", "method=finetune", *QUICK],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    same_numbers(all_methods / "finetune", out)


@pytest.mark.slow
def test_with_sync_bn_the_numbers_follow_one_process(tmp_path):
    """The same config in one process and in two: state 1 (one fit from the same start) agrees
    to float precision; after it, herding ranks near-tied exemplars by features that differ in
    the last bits, so some exemplars differ and the accuracies drift by a few tenths (measured:
    at most 0.5 points per state, 0.04 on the mean: RESULTS.md section 11). Tolerance: 2 points per state, 1 on the
    mean incremental top-1."""
    args = ["--set", "method=finetune", *COMMON]
    done = torchrun("--out", str(tmp_path / "two"), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "cilkit", "run", "--out", str(tmp_path / "one"), *args],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "history.jsonl").read_text().splitlines()
               if json.loads(line)["state"] == 1 and "loss" in json.loads(line)] for d in ("one", "two")]
    assert len(losses[0]) == 12 and np.allclose(losses[0], losses[1], rtol=1e-2, atol=1e-4)
    r1, r2 = results(tmp_path / "one"), results(tmp_path / "two")
    assert r2["provenance"]["ranks"] == 2 and r1["provenance"]["ranks"] == 1
    assert max(abs(a["top1"] - b["top1"]) for a, b in zip(r1["states"], r2["states"])) <= 2.0
    assert abs(r1["mean_incremental_top1"] - r2["mean_incremental_top1"]) <= 1.0


DYING_METHOD = textwrap.dedent('''
    import os
    from pathlib import Path

    from cilkit.common import distributed
    from cilkit.methods.finetune import Finetune
    from cilkit.settings.registry import register_method


    @register_method("finetune_dies")
    class FinetuneThatDies(Finetune):
        description = "fine-tuning whose rank 1 dies as state 3 starts while a marker file exists (a test fault)"

        def before_state(self, ctx):
            marker = Path(os.environ["CILKIT_TEST_MARKER"])
            if ctx.state.index == 2 and distributed.rank() == 1 and marker.exists():
                marker.unlink()
                os._exit(1)
            super().before_state(ctx)
''')


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_run_and_the_run_resumes_to_the_same_numbers(all_methods, tmp_path):
    plugin, marker = tmp_path / "dies.py", tmp_path / "marker"
    plugin.write_text(DYING_METHOD)
    marker.touch()
    out, env = tmp_path / "run", {"CILKIT_TEST_MARKER": str(marker)}
    start = time.monotonic()
    died = torchrun("--out", str(out), "--plugin", str(plugin), "--set", "method=finetune_dies", *QUICK, env=env)
    assert died.returncode != 0 and time.monotonic() - start < 240
    assert "error: rank 0:" in died.stderr  # the surviving rank says what happened and how to go on
    assert f"--resume {out}" in died.stderr
    partial = results(out)
    assert len(partial["states"]) == 2 and not partial["complete"]
    resumed = torchrun("--resume", str(out), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(out)["complete"]
    same_numbers(all_methods / "finetune", out)  # as if it had never stopped


def test_shards_cover_every_position_once():
    for n in (0, 1, 2, 7, 64):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1


GLOBAL_BN = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from cilkit.common.distributed import GlobalBatchNorm, shard_bounds

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(7, 3, 4, 4) * 3 + 1  # 7 images: slices of 4 and 3
    w = torch.randn(3)
    ref = torch.nn.BatchNorm2d(3)
    ours = GlobalBatchNorm(3)
    ours.load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * w.view(1, 3, 1, 1)).sum().backward()
    lo, hi = shard_bounds(7, rank, world)
    xs = x[lo:hi].clone().requires_grad_()
    y = ours(xs)
    (y * w.view(1, 3, 1, 1)).sum().backward()
    report = {
        "out": torch.allclose(y, y_ref[lo:hi].detach(), atol=1e-5),
        "grad_input": torch.allclose(xs.grad, xr.grad[lo:hi], atol=1e-5),
        "running": torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
                   and torch.allclose(ours.running_var, ref.running_var, atol=1e-5),
    }
    grads = torch.stack([ours.weight.grad, ours.bias.grad])
    dist.all_reduce(grads)  # what DDP does with the affine parameters' gradients
    report["grad_affine"] = torch.allclose(grads, torch.stack([ref.weight.grad, ref.bias.grad]), atol=1e-4)
    if rank == 0:
        print(json.dumps(report))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_global_batchnorm_on_two_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    script = tmp_path / "bn.py"
    script.write_text(GLOBAL_BN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"out": True, "grad_input": True, "running": True, "grad_affine": True}
