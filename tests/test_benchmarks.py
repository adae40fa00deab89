"""Smoke tests of the benchmark scripts (benchmarks/ is not a package: loaded by path), each a
tiny run at one thread."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml

from helpers import tiny_dict

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _table(text: str, first: str) -> list[list[str]]:
    """The cells of the Markdown rows of ``text`` whose first cell is ``first``."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {first} |")]


# ----- bench_throughput ------------------------------------------------------------------------------
def test_throughput_settings_parse_and_default():
    bench = _load("bench_throughput")
    s = bench.parse_setting("bf16-cl+compile")
    assert (s.amp, s.channels_last, s.compile, s.name) == (True, True, True, "bf16-cl+compile")
    assert bench.parse_setting("fp32") == bench.Setting()
    for bad in ("fp16", "fp32-nhwc", "bf16+jit", "cl"):
        with pytest.raises(Exception, match="unknown setting"):
            bench.parse_setting(bad)
    assert [s.name for s in bench.parse_args([]).settings] == ["fp32", "fp32-cl", "bf16-cl"]
    assert [s.name for s in bench.parse_args(["--amp"]).settings] == ["bf16"]  # the CLI before --settings
    assert [s.name for s in bench.parse_args(["--channels-last"]).settings] == ["fp32-cl"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--amp", "--settings", "fp32"])
    assert "resnet18-224" in [c.name for c in bench.CASES]
    big = next(c for c in bench.CASES if c.name == "resnet18-224")
    assert (big.backbone, big.size, big.channels) == ("resnet18", 224, 3)
    resized = bench.sized(big, bench.parse_args(["--per-class", "3", "--classes", "5"]))
    assert (resized.per_class, resized.classes) == (3, 5)


def test_per_sample_images_pad_crop_flip_and_normalise():
    bench = _load("bench_throughput")
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    plain = bench.PerSampleImages(images, np.arange(4), mean, std, crop_pad=2, flip=True, train=False)
    x, y = plain[1]
    assert y == 1 and x.shape == (3, 8, 8) and x.dtype.is_floating_point
    expected = (images[1].transpose(2, 0, 1) / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    train = bench.PerSampleImages(images, np.arange(4), mean, std, crop_pad=2, flip=True, train=True, seed=1)
    padded = np.pad(images[1].transpose(2, 0, 1) / 255.0, ((0, 0), (2, 2), (2, 2)))
    flips, offsets = set(), set()
    for _ in range(40):
        got = train[1][0].numpy() * std[:, None, None] + mean[:, None, None]
        match = [(t, le, f) for t in range(5) for le in range(5) for f in (False, True)
                 if np.allclose((padded[:, t:t + 8, le:le + 8])[:, :, ::-1] if f else padded[:, t:t + 8, le:le + 8],
                                got, atol=1e-5)]
        assert match, "not a flip of a crop of the padded image"
        flips.add(match[0][2])
        offsets.add(match[0][:2])
    assert flips == {False, True} and len(offsets) > 1
    gray = bench.PerSampleImages(images[..., :1].copy(), np.arange(4), mean[:1], std[:1], crop_pad=2, flip=True)
    assert gray[0][0].shape == (1, 8, 8)


def test_throughput_grid_with_the_per_sample_pipeline(capsys):
    bench = _load("bench_throughput")
    rows = bench.main(["--cases", "convnet-28x28", "--per-class", "6", "--classes", "4", "--epochs", "1",
                       "--threads", "1", "--batch-size", "8", "--eval-batch-size", "16", "--workers", "0",
                       "--settings", "fp32", "fp32-cl"])
    out = capsys.readouterr().out
    assert [(r.case, r.setting, r.per_sample) for r in rows] == [
        ("convnet-28x28", "fp32", False), ("convnet-28x28", "fp32-cl", False),
        ("convnet-28x28", "per-sample fp32, 0 workers", True)]
    assert all(r.images == 24 and r.train_ips > 0 and r.eval_ips > 0 for r in rows)
    cells = _table(out, "convnet-28x28")
    assert [c[2] for c in cells] == ["fp32", "fp32-cl", "per-sample fp32, 0 workers"]
    assert all(float(c[3]) > 0 and float(c[4]) > 0 for c in cells)  # train, eval images/s
    assert all(float(c[5]) > 0 and float(c[6]) > 0 for c in cells)  # the ratios to the per-sample row
    assert cells[-1][5:] == ["1.00", "1.00"]
    ratio = rows[0].train_ips / rows[2].train_ips
    assert float(cells[0][5]) == pytest.approx(ratio, abs=0.006)


# ----- bench_protocol --------------------------------------------------------------------------------
def test_protocol_milestones_scale_and_stay_valid():
    bench = _load("bench_protocol")
    assert bench.scaled_milestones([80, 120], 160, 160) == [80, 120]
    assert bench.scaled_milestones([80, 120], 160, 8) == [4, 6]
    assert bench.scaled_milestones([80, 120], 160, 10) == [5, 8]
    assert bench.scaled_milestones([80, 120], 160, 2) == [1, 2]
    assert bench.scaled_milestones([80, 120], 160, 1) == [1, 2]  # at least 1, and increasing


def test_protocol_config_keeps_the_lucir_schedule():
    bench = _load("bench_protocol")
    full, scaling = bench.protocol_config(bench.parse_args(["--threads", "1"]))
    assert not scaling.scaled and scaling.describe() == "the full protocol"
    assert full["method"] == "lucir" and full["state0_cache"] is None
    assert full["train"]["epochs"] == 160 and full["train"]["schedule"]["milestones"] == [80, 120]
    assert (full["train"]["batch_size"], full["train"]["lr"]) == (128, 0.1)
    assert full["memory"]["per_class"] == 20 and full["model"]["backbone"] == "resnet32"
    assert (full["scenario"]["initial"], full["scenario"]["increment"]) == (50, 10)
    assert full["lucir"]["lambda_base"] == 5 and full["lucir"]["margin"] == 0.5 and full["lucir"]["top_k"] == 2
    assert full["data"]["name"] == "synthetic" and (full["data"]["crop_pad"], full["data"]["flip"]) == (4, True)
    assert full["data"]["synthetic"] == {"num_classes": 100, "train_per_class": 500, "test_per_class": 100,
                                         "size": 32, "channels": 3}
    _, same = bench.protocol_config(bench.parse_args(["--epochs", "160", "--per-class", "500"]))
    assert not same.scaled


@pytest.mark.slow
def test_protocol_scaled_run_completes_every_lucir_state(capsys, tmp_path):
    bench = _load("bench_protocol")
    out_dir = tmp_path / "run"
    # one training image per class: --per-class 2 costs ~25 s of CPU here (ResNet-32 forwards for
    # herding, class means, statistics and the teacher dominate), 1 about 15 s
    got = bench.main(["--epochs", "1", "--per-class", "1", "--test-per-class", "1", "--threads", "1",
                      "--out", str(out_dir)])
    text = capsys.readouterr().out
    results = got["results"]
    assert results["method"] == "lucir" and results["complete"]
    assert [s["classes_seen"] for s in results["states"]] == [50, 60, 70, 80, 90, 100]
    assert got["scaled"] and "scaled" in text and "NOT the full protocol" in text
    assert "1 of 160 epochs, milestones [1, 2] of [80, 120]" in text
    assert got["wall_s"] > 0
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())  # what the run ran
    assert saved["state0_cache"] is None and saved["method"] == "lucir" and saved["threads"] == 1
    assert saved["train"]["epochs"] == 1 and saved["train"]["schedule"]["milestones"] == [1, 2]
    assert saved["memory"]["per_class"] == 20 and saved["lucir"]["lambda_base"] == 5
    cells = [row for b in range(1, 7) for row in _table(text, str(b))]  # the per-state table
    assert [c[:2] for c in cells] == [[str(b), str(n)] for b, n in zip(range(1, 7), range(50, 101, 10))]
    assert all(float(c[3]) > 0 and float(c[4]) > 0 for c in cells)  # seconds, training images/s


# ----- bench_sir_ablation ----------------------------------------------------------------------------
def test_sir_ablation_table_of_a_tiny_run(capsys, tmp_path):
    bench = _load("bench_sir_ablation")
    protocol = tiny_dict(tmp_path) | {"threads": 1}
    protocol["train"] = {**protocol["train"], "epochs": 1}
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(protocol))
    off = {"frequency_compensation": False, "inheritance_transfer": False, "chronological_attenuation": False}
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(
        {"protocol": "protocol.yaml", "memory_per_class": [5], "variants": {"none": off, "finetune": None}}))
    out = tmp_path / "out"
    bench.main([str(tmp_path / "ablation.yaml"), "--out", str(out)])
    text = capsys.readouterr().out
    assert "### memory: per_class_5, seed 3" in text
    assert "| method | 4 cl. | 7 cl. | 10 cl. | mean inc." in text  # a column per state
    rows = {c[0]: c for c in _table(text, "none") + _table(text, "finetune")}
    assert set(rows) == {"none", "finetune"}
    assert all(float(v) >= 0 for c in rows.values() for v in c[1:4])  # top-1 after each state
    assert (out / "ablation.md").read_text().strip() in text  # printed (after the runs' own lines) and written


# ----- group_offset ---------------------------------------------------------------------------------
def test_group_offset_figures_of_four_images_by_hand():
    bench = _load("group_offset")
    # 2 old classes (0, 1), 2 new (2, 3); labels 0, 1, 2, 3
    logits = np.array([[5.0, 1.0, 6.0, 0.0],    # old image, predicted new class 2; within old: 0 (right)
                       [0.0, 3.0, 1.0, 2.0],    # old image, predicted 1 (right)
                       [0.0, 0.0, 4.0, 1.0],    # new image, predicted 2 (right)
                       [2.0, 0.0, 1.0, 0.5]])   # new image, predicted old class 0; within new: 2 (wrong)
    f = bench.state_figures(logits, np.array([0, 1, 2, 3]), n_old=2)
    assert f["top1"] == 50.0            # images 2 and 3
    assert f["within group"] == 75.0    # 0 -> 0, 1 -> 1, 2 -> 2, 3 -> 2
    assert f["right group"] == 50.0     # image 1 predicted new, image 4 predicted old
    assert f["new share"] == 50.0       # images 1 and 3
    assert f["offset"] == pytest.approx(((6 - 5) + (2 - 3) + (4 - 0) + (1 - 2)) / 4)


def _scored_run(path, method, ends, logits_by_state):
    """A run directory as group_offset reads it: results.json and scores/state_XX.npz."""
    (path / "scores").mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"method": method, "state_ends": ends}))
    for b, logits in logits_by_state.items():
        logits = np.asarray(logits, dtype=np.float32)
        np.savez(path / "scores" / f"state_{b:02d}.npz", logits=logits, labels=np.arange(len(logits)))


def test_group_offset_keeps_one_methods_runs_on_two_protocols_apart(tmp_path, capsys):
    bench = _load("group_offset")
    right = np.eye(4) * 3  # every image right
    wrong_group = np.array([[.5, 0, 1, 0], [0, .5, 0, 1], [1, 0, .5, 0], [0, 1, 0, .5]])  # right class 2nd
    _scored_run(tmp_path / "a" / "run_0", "ssil", [2, 4], {1: right})             # 2 states of 2
    _scored_run(tmp_path / "b" / "run_0", "ssil", [1, 2, 4], {1: right[:2, :2], 2: wrong_group})  # 3 states
    bench.main([str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ssil, classes seen 2, 4 (1 runs)")
    assert out[1].split(" | ")[:4] == ["  2", "100.00", "100.00", "100.00"]
    assert out[2].split(" | ")[:4] == ["  mean", "100.00", "100.00", "100.00"]
    assert out[3].startswith("ssil, classes seen 1, 2, 4 (1 runs)")
    # its third state: every image in the other group (right group 0), within-group all right
    assert out[5].split(" | ")[:4] == ["  3", "0.00", "100.00", "0.00"]
    assert out[6].split(" | ")[:4] == ["  mean", "50.00", "100.00", "50.00"]  # states 2 and 3


# ----- bench_omp_policy ------------------------------------------------------------------------------
def test_omp_policy_runs_that_write_much_finish_and_a_stopped_case_says_so():
    """Two processes started together that each write 300 KB to stdout and stderr (more than a pipe
    holds) both finish, and their marker line is read back; a case past its limit is stopped."""
    bench = _load("bench_omp_policy")
    code = 'import sys; sys.stdout.write("x" * 300000 + "\\nidle threads: 3\\n"); sys.stderr.write("e" * 300000)'
    cmd = [sys.executable, "-c", code]
    timings = bench.run_together([cmd, cmd], [{}, {}], limit_s=60)
    assert [t.first_line for t in timings] == ["idle threads: 3", "idle threads: 3"]
    with pytest.raises(bench.CaseStopped, match="stopped at 1 s"):
        bench.run_together([[sys.executable, "-c", "import time; time.sleep(30)"]], [{}], limit_s=1)
