"""A run's memory: its peak is recorded in its provenance (its own, also when a process makes
several runs), and importing cilkit holds only what a run needs (scikit-learn and scipy only when
PODNet's k-means or the digits reader asks for them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cilkit.common import machine
from cilkit.run.loop import Run
from helpers import tiny_config


def test_a_run_records_its_own_peak_memory(tmp_path):
    if not machine.reset_peak_rss():
        pytest.skip("the peak resident memory cannot be reset here (/proc/self/clear_refs)")
    big = torch.ones(150_000_000, dtype=torch.float32)  # 600 MB held, then let go before the run
    big.add_(1)
    held = machine.peak_rss()
    del big
    assert held is not None and held > 600 * 2**20
    results = Run(tiny_config(tmp_path, "scenario.states=2", "train.epochs=1"), tmp_path / "run",
                  progress=False).execute()
    prov = results["provenance"]
    assert prov["peak_rss_since"] == "run"
    assert 50 * 2**20 < prov["peak_rss_bytes"] < held - 300 * 2**20  # the run's, not the process's
    assert json.loads((tmp_path / "run" / "results.json").read_text())["provenance"]["peak_rss_bytes"] == \
        prov["peak_rss_bytes"]


def test_a_resumed_run_keeps_the_largest_peak_of_its_attempts(tmp_path):
    cfg = tiny_config(tmp_path, "scenario.states=2", "train.epochs=1", "threads=1")
    Run(cfg, tmp_path / "run", progress=False).execute(until_state=0)
    path = tmp_path / "run" / "results.json"
    first = json.loads(path.read_text())["provenance"]["peak_rss_bytes"]
    # an earlier attempt that peaked far higher (as a checkpoint would carry it)
    ckpt = next((tmp_path / "run").rglob("*.pt"))
    state = torch.load(ckpt, weights_only=False)
    results = json.loads(state["results"])
    results["provenance"]["peak_rss_bytes"] = first + 10 * 2**30
    state["results"] = json.dumps(results)
    torch.save(state, ckpt)
    resumed = Run(cfg, tmp_path / "run", progress=False).execute(resume=True)
    assert resumed["provenance"]["peak_rss_bytes"] == first + 10 * 2**30


def test_importing_cilkit_loads_neither_scikit_learn_nor_scipy():
    code = "import sys, cilkit.cli; print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
