"""The CUDA path: bf16 autocast, channels-last, torch.compile, and data parallel on NCCL.
Skipped without a GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_gpu.py``."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from helpers import tiny_config

from cilkit.run.loop import Run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_channels_last_run_on_the_gpu_records_it(tmp_path):
    res = Run(tiny_config(tmp_path, "device=cuda", "amp=true", "channels_last=true"), tmp_path / "r",
              progress=False).execute()
    assert res["complete"] and res["states"][-1]["top1"] > 50
    env = res["provenance"]
    assert env["device"].startswith("cuda") and env["precision"] == "bf16 autocast"
    assert env["memory_format"] == "channels_last" and env["device_name"] != "cpu"


def test_the_gpu_run_is_deterministic(tmp_path):
    runs = [Run(tiny_config(tmp_path, "device=cuda", "state0_cache=null"), tmp_path / f"r{k}", progress=False).execute()
            for k in range(2)]
    assert [s["top1"] for s in runs[0]["states"]] == [s["top1"] for s in runs[1]["states"]]


def test_compile_on_the_gpu_completes_without_falling_back(tmp_path, capsys):
    res = Run(tiny_config(tmp_path, "device=cuda", "compile=true", "scenario.states=2"), tmp_path / "c",
              progress=False).execute()
    assert res["complete"]
    assert "torch.compile failed" not in capsys.readouterr().out


def _host_syncs(tmp_path, name: str, *overrides: str) -> int:
    """The synchronising CUDA calls a run makes (torch's sync debug mode counts them)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Run(tiny_config(tmp_path, "device=cuda", "state0_cache=null", *overrides), tmp_path / name,
                progress=False).execute()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", ["finetune", "lucir", "podnet", "bic", "sir"])
def test_training_batches_do_not_synchronise_the_host(tmp_path, method):
    """Four times as many training batches, the same number of host syncs: none per batch
    (what remains is per fit, per epoch and per state, and evaluation)."""
    few = _host_syncs(tmp_path, "few", f"method={method}", "train.batch_size=64")
    many = _host_syncs(tmp_path, "many", f"method={method}", "train.batch_size=16")
    assert few == many, (few, many)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_under_torchrun_use_nccl(tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cilkit", "run", "--out", str(out), "--set", "device=cuda",
                           "--set", "train.sync_bn=true", "--set", "train.epochs=2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for m in ("finetune", "icarl"):
        r = json.loads((out / m / "results.json").read_text())
        assert r["complete"] and r["provenance"]["backend"] == "nccl" and r["provenance"]["ranks"] == 2
