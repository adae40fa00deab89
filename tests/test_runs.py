"""End-to-end runs on digits: run directory, resume equality, state-0 cache, each method."""

import json

import numpy as np
import pytest
from helpers import strip_timings, tiny_config

from cilkit.cli import main
from cilkit.common.io import load_torch
from cilkit.run.loop import Run


def test_run_directory_and_results(tmp_path):
    cfg = tiny_config(tmp_path)
    res = Run(cfg, tmp_path / "run", progress=False).execute()
    d = tmp_path / "run"
    assert (d / "config.yaml").is_file()
    on_disk = json.loads((d / "results.json").read_text())
    assert strip_timings(on_disk) == strip_timings(res)
    assert on_disk["complete"] and len(on_disk["states"]) == 3
    assert [s["classes_seen"] for s in on_disk["states"]] == [4, 7, 10]
    for b, s in enumerate(on_disk["states"]):
        for key in ("top1", "top5", "top1_new", "balanced_top1"):
            assert 0.0 <= s[key] <= 100.0
        assert (s["top1_old"] is None) == (b == 0)
        npz = np.load(d / "scores" / f"state_{b:02d}.npz")
        assert npz["logits"].shape[1] == s["classes_seen"]
        assert npz["labels"].max() < s["classes_seen"]
        # top1 in results.json is recomputable from the stored scores
        acc = 100 * (npz["scores"].argmax(1) == npz["labels"]).mean()
        assert abs(acc - s["top1"]) < 1e-6
        mem = json.loads((d / "memory" / f"state_{b:02d}.json").read_text())
        assert sum(len(v) for v in mem["exemplars"].values()) == s["memory_size"] <= 60
    matrix = on_disk["accuracy_matrix"]
    assert [len(r) for r in matrix] == [1, 2, 3]
    assert on_disk["mean_incremental_top1"] == pytest.approx(np.mean([s["top1"] for s in on_disk["states"]]))
    assert on_disk["mean_incremental_top1_excl_first"] == pytest.approx(np.mean([s["top1"] for s in on_disk["states"][1:]]))
    assert on_disk["average_forgetting"] is not None
    assert not list(d.rglob("*.tmp")), "no temporary file left behind"
    # the checkpoint loads without executing code and holds what a resume needs
    ckpt = load_torch(sorted((d / "checkpoints").glob("*.pt"))[-1])
    assert set(ckpt) == {"state", "num_classes", "architecture", "model", "method", "memory", "statistics", "results",
                         "config", "data", "code"}
    assert ckpt["architecture"] == {"num_classes": 10}  # the model's shape: a plain backbone, no auxiliary head
    assert len(list((d / "checkpoints").glob("*.pt"))) == 1  # keep_checkpoints: last


def test_same_config_same_numbers(tmp_path):
    cfg = tiny_config(tmp_path, "state0_cache=null")
    a = Run(cfg, tmp_path / "a", progress=False).execute()
    b = Run(cfg, tmp_path / "b", progress=False).execute()
    assert strip_timings(a) == strip_timings(b)


@pytest.mark.parametrize("method", ["finetune", "icarl", "lucir", "bic", "sir", "joint"])
@pytest.mark.slow
def test_resume_gives_the_uninterrupted_results(tmp_path, method):
    cfg = tiny_config(tmp_path, f"method={method}", "state0_cache=null", "memory.selection=random")
    full = Run(cfg, tmp_path / "full", progress=False).execute()
    Run(cfg, tmp_path / "cut", progress=False).execute(until_state=0)  # "killed" after state 1
    partial = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert len(partial["states"]) == 1 and not partial["complete"]
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert strip_timings(resumed) == strip_timings(full)
    for b in range(3):
        x = np.load(tmp_path / "full" / "scores" / f"state_{b:02d}.npz")
        y = np.load(tmp_path / "cut" / "scores" / f"state_{b:02d}.npz")
        assert np.array_equal(x["logits"], y["logits"])


def test_state0_cache_is_reused_and_gives_the_same_state0(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    first = Run(cfg, tmp_path / "one", progress=False).execute()
    assert first["states"][0]["state0_cached"] is False
    capsys.readouterr()
    second = Run(cfg.for_method("finetune"), tmp_path / "two", progress=False).execute()
    assert "reusing the cached state-0 model" in capsys.readouterr().out
    assert second["states"][0]["state0_cached"] is True
    assert strip_timings(second["states"]) == strip_timings(first["states"])
    # a different seed is a different state-0 model: no reuse
    third = Run(tiny_config(tmp_path, "seed=4"), tmp_path / "three", progress=False).execute()
    assert third["states"][0]["state0_cached"] is False


def test_icarl_reports_nme_and_cnn(tmp_path):
    res = Run(tiny_config(tmp_path, "method=icarl"), tmp_path / "r", progress=False).execute()
    assert res["primary_scores"] == "nme"
    for s in res["states"]:
        assert set(s["variants"]) == {"cnn"}
        assert 0 <= s["variants"]["cnn"]["top1"] <= 100


def test_joint_trains_on_all_seen_data_and_finetune_on_new_plus_memory(tmp_path):
    joint_run = Run(tiny_config(tmp_path, "method=joint"), tmp_path / "j", progress=False)
    joint = joint_run.execute()
    ft = Run(tiny_config(tmp_path), tmp_path / "f", progress=False).execute()
    sc = joint_run.scenario
    assert joint["states"][-1]["train_images"] == len(joint_run.dataset.train)  # all 10 classes
    assert ft["states"][-1]["train_images"] == sc.state(2).train.numel() + 60  # new data + memory
    assert ft["states"][-1]["memory_size"] == 60


def test_no_memory_means_no_exemplars(tmp_path):
    res = Run(tiny_config(tmp_path, "memory.total=0"), tmp_path / "r", progress=False).execute()
    assert all(s["memory_size"] == 0 for s in res["states"])


@pytest.mark.slow
def test_several_methods_share_one_parent_directory(tmp_path, capsys):
    code = main(["run", "--out", str(tmp_path / "cmp"), "--methods", "finetune,icarl",
                 "--set", "train.epochs=1", "--set", "scenario.states=2", "--set", "model.width=8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| finetune |" in out and "| icarl |" in out
    for m in ("finetune", "icarl"):
        assert json.loads((tmp_path / "cmp" / m / "results.json").read_text())["method"] == m


def test_a_state_that_learned_nothing_is_warned_about(tmp_path, capsys):
    """lr 1e-9: the loss cannot move, so every state ends where it started."""
    res = Run(tiny_config(tmp_path, "scenario.states=2", "train.lr=1e-9", "state0_cache=null"),
              tmp_path / "r", progress=False).execute()
    out = capsys.readouterr().out
    assert out.count("may have learned nothing") == 2
    s0 = res["states"][0]
    assert s0["final_loss"] >= 0.9 * s0["first_loss"]
    capsys.readouterr()
    Run(tiny_config(tmp_path, "scenario.states=2", "state0_cache=null"), tmp_path / "ok", progress=False).execute()
    assert "may have learned nothing" not in capsys.readouterr().out


def test_results_say_where_and_how_they_were_made(tmp_path):
    import torch

    import cilkit

    cfg = tiny_config(tmp_path, "scenario.states=2", "threads=1")
    Run(cfg, tmp_path / "r", progress=False).execute(until_state=0)
    res = Run(cfg, tmp_path / "r", progress=False).execute(resume=True)
    p = res["provenance"]
    assert p["cilkit"] == cilkit.__version__ and p["torch"] == torch.__version__
    assert p["threads"] == 1 and p["device"] == "cpu" and p["device_name"]
    assert p["precision"] == "fp32" and p["memory_format"] == "contiguous"
    assert p["started"] <= p["finished"] and p["command"]
    assert len(p["resumed"]) == 1 and p["resumed"][0]["at"] >= p["started"]
    assert p["git_commit"] is None or len(p["git_commit"].removesuffix("+dirty")) == 40
