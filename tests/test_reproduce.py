"""``cilkit reproduce`` (issue 41 item 3): a paper config over N seeds with its report, ``--list``
with the targets and the compute each paper config needs, and the refusals in one line."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cilkit.cli import main
from cilkit.settings.config import load_config
from cilkit.settings.packaged import packaged_names, resolve_config
from cilkit.data.nominal import nominal_size
from cilkit.runs.reproduce import compute_text, images_per_seed, stages_of

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 8, 3


def write_tiny_cifar100(root: Path) -> None:
    """A CIFAR-100-format folder (``cifar-100-python/{train,test,meta}`` pickles) of 4 classes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        labels = [c for c in range(CLASSES) for _ in range(per_class)]
        data = rs.randint(0, 256, (len(labels), 3072)).astype(np.uint8)
        (folder / split).write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(CLASSES)]}))


def tiny_paper_config(tmp_path: Path, paper: bool = True) -> Path:
    data = {
        "name": "tiny-paper", "seed": 3, "method": "finetune",
        "data": {"name": "cifar100", "root": None},
        "scenario": {"order": 1993, "initial": 2, "increment": 2},
        "memory": {"total": 8},
        "model": {"backbone": "convnet", "width": 8},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "state0_cache": None, "threads": 1,
    }
    if paper:
        data["paper"] = {"title": "A tiny paper", "venue": "Tests 2025", "table": "Table 1", "value": 42.5,
                         "paper_runs": 5, "source": "written by the test"}
    path = tmp_path / ("paper.yaml" if paper else "plain.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_reproduce_runs_the_seeds_and_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 41 item 3: ``cilkit reproduce CONFIG --seeds 2 --out DIR`` on a tiny CIFAR-format
    file runs seeds 3 and 4 (the config's seed, then the next) through cilkit run's path and
    writes the report in DIR/report, the paper's figure in it; ``--resume`` of the finished
    reproduction runs nothing again, and a NAME other than the one it reproduces is one line."""
    write_tiny_cifar100(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["reproduce", str(tiny_paper_config(tmp_path)), "--seeds", "2", "--out", str(out),
                 "--set", f"data.root={tmp_path / 'data'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == 2 and summary["seeds"] == [3, 4]  # --seeds 2 over the paper's 5 runs
    for k, seed in enumerate((3, 4)):
        assert yaml.safe_load((out / f"run_{k}" / "config.yaml").read_text())["seed"] == seed
        assert len(json.loads((out / f"run_{k}" / "results.json").read_text())["states"]) == 2
    assert (out / "report" / "report.html").is_file()
    table = (out / "report" / "table.md").read_text()
    assert "A tiny paper" in table and "42.5" in table  # the paper's figure beside the runs'
    assert yaml.safe_load((out / "config.yaml").read_text())["paper"]["value"] == 42.5  # what the report reads
    capsys.readouterr()

    assert main(["reproduce", "--resume", "--out", str(out)]) == 0
    assert "2 of 2 runs finished already; running the other 0" in capsys.readouterr().out
    assert main(["reproduce", "lucir-cifar100-b50-5steps", "--resume", "--out", str(out)]) == 2
    assert "holds a reproduction of 'tiny-paper', not of 'lucir-cifar100-b50-5steps'" in one_error_line(capsys)


def paper_configs_by_hand() -> dict[str, dict]:
    """The packaged configs of a paper's protocol, read from their files: a ``paper:`` block or
    the comment ``# paper: no figure reported ...``."""
    found = {}
    for name in packaged_names():
        text = resolve_config(name).read_text()
        data = yaml.safe_load(text)
        if "paper" in data or re.search(r"^# paper:", text, re.MULTILINE):
            found[name] = data
    return found


def paper_figure(paper: dict) -> float:
    """The paper's figure: its value, else the last state's or the mean of the states it lists."""
    if paper.get("value") is not None:
        return paper["value"]
    states = paper["per_state"]
    if paper.get("metric") == "last":
        return states[-1]
    kept = states if paper.get("include_first", True) else states[1:]
    return sum(kept) / len(kept)


def test_list_shows_every_paper_config_with_its_target_and_compute(capsys: pytest.CaptureFixture[str]) -> None:
    """issue 41 item 3: ``cilkit reproduce --list``: one line per paper config (name, method, the
    target or "no target", the images per seed and for the default seeds: the paper's runs);
    LUCIR CIFAR-100 B50 5 steps: 9.12M images a seed (see the estimate test), 3 runs in the paper."""
    assert main(["reproduce", "--list"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("cilkit ")]
    expected = paper_configs_by_hand()
    assert [line.split()[0] for line in lines] == sorted(expected)
    for line in lines:
        name, method = line.split()[:2]
        data = expected[name]
        assert method == data["method"]
        assert (f"{paper_figure(data['paper']):.2f} (" in line) if "paper" in data else "no target" in line
        assert re.search(r"\d+\.\d\dM images/seed, \d+\.\d\dM for \d+ seeds?$", line), line
    lucir = next(line for line in lines if line.startswith("lucir-cifar100-b50-5steps "))
    assert "9.12M images/seed, 27.36M for 3 seeds" in lucir


# Hand computations of the images one seed processes (CIFAR-100: 500 training images a class).
# LUCIR B50 5 steps (160 epochs, 20 exemplars per class): state 0 trains on 50 x 500 = 25,000
# images; state b = 1..5 on 10 x 500 = 5,000 new images + 20 exemplars of each of the
# 50, 60, 70, 80, 90 old classes (1,000 ... 1,800; 7,000 in all): 160 x (25,000 + 25,000 + 7,000)
# = 9,120,000. (Issue 41's "~9.6M" is 160 x 60,000: a fixed memory of 2,000 in every state.)
LUCIR_B50_5 = 160 * (50 * 500 + 5 * 10 * 500 + 20 * (50 + 60 + 70 + 80 + 90))
# PODNet B50 5 steps: LUCIR's schedule, plus 20 epochs of class-balanced finetuning over the
# 20 exemplars of every seen class after states 1..5 (60, 70, 80, 90, 100 classes).
PODNET_B50_5 = LUCIR_B50_5 + 20 * 20 * (60 + 70 + 80 + 90 + 100)
# BiC B0 10 x 10 (250 epochs, memory 2,000, val_ratio 0.1): the old classes' smallest share in
# state b = 1..9 is floor(2000 / 10b) = 200, 100, 66, 50, 40, 33, 28, 25, 22, so v_b = floor of a
# tenth, at least 1 = 20, 10, 6, 5, 4, 3, 2, 2, 2 (BiC's "Val Samples" row), and state 0 holds out
# v_1 = 20. State 0: 250 x (5,000 - 10 x 20). State b: the new 5,000 less 10 v_b, the 2,000
# exemplars less v_b for each of the 10b old classes: 7,000 - 10 v_b (b + 1). The bias stage
# sees v_b images of each of the 10 (b + 1) seen classes once.
BIC_V = [20, 10, 6, 5, 4, 3, 2, 2, 2]
BIC_HELD = sum(10 * v * (b + 2) for b, v in enumerate(BIC_V))  # 2,180
BIC_B0_10 = {"training": 250 * (4800 + 9 * 7000 - BIC_HELD), "bias stage": BIC_HELD}
# EEIL B0 10 x 10 (40 epochs, memory 2,000, 30 epochs of balanced finetuning on the memory).
EEIL_B0_10 = {"training": 40 * (5000 + 9 * 7000), "balanced finetuning": 30 * 2000 * 9}
# GDumb B0 10 x 10 (256 epochs, memory 2,000): the memory alone, full from state 0 on (10 x 500 > 2,000).
GDUMB_B0_10 = {"training": 256 * 2000 * 10}
# SS-IL B0 10 x 10 (100 epochs, batch 160 with 32 replayed): state 0 its 5,000 images; later the
# 5,000 new images fill 5000 // 128 = 39 full batches, each with 32 exemplars.
SSIL_B0_10 = {"training": 100 * 5000 + 9 * 100 * (5000 + 39 * 32)}
# LUCIR ImageNet-Subset (about 1,300 images a class; 90 epochs; class-balanced finetuning of 20
# epochs over 20 exemplars of every seen class).
LUCIR_IMAGENET = {"training": 90 * (50 * 1300 + 5 * 10 * 1300 + 20 * (50 + 60 + 70 + 80 + 90)),
                  "class-balanced finetuning": 20 * 20 * (60 + 70 + 80 + 90 + 100)}


@pytest.mark.parametrize("name,expected", [
    ("lucir-cifar100-b50-5steps", {"training": LUCIR_B50_5, "class-balanced finetuning": 0}),
    ("podnet-cifar100-b50-5steps", {"training": LUCIR_B50_5, "class-balanced finetuning": PODNET_B50_5 - LUCIR_B50_5}),
    ("bic-cifar100-b0-10", BIC_B0_10),
    ("eeil-cifar100-b0-10", EEIL_B0_10),
    ("gdumb-cifar100-b0-10", GDUMB_B0_10),
    ("ssil-cifar100-b0-10", SSIL_B0_10),
    ("lucir-imagenet-subset", LUCIR_IMAGENET),
])
def test_compute_estimate_matches_the_hand_computation(name: str, expected: dict[str, int]) -> None:
    """issue 41 item 3: the images a seed processes, stage by stage, as computed by hand above
    (LUCIR B50 5 steps: 9,120,000; PODNet adds its finetuning; BiC without its validation images
    plus its bias stage; EEIL's balanced stage; GDumb's memory; SS-IL's replay; ImageNet-Subset
    by the config's name)."""
    config = load_config(name)
    assert stages_of(config) == expected
    assert images_per_seed(config) == sum(expected.values())


def test_the_estimate_reads_the_published_size_or_says_it_is_unknown(tmp_path: Path) -> None:
    """issue 41 item 3: synthetic data is sized by its own keys (10 classes of 40 images, states of
    2 classes, 2 epochs, 20 exemplars: 2 x 80 + 4 x 2 x (80 + 20) = 960; with 5 of each class held
    out for validation: 2 x 70 + 4 x 2 x (70 + 20) = 860); image files not named after a known
    dataset have no published size: "unknown", never a guess."""
    synthetic = ["data.name=synthetic", "scenario.initial=2", "scenario.increment=2", "memory.total=20",
                 "train.epochs=2", "method=finetune"]
    assert images_per_seed(load_config(None, synthetic)) == 960
    assert images_per_seed(load_config(None, [*synthetic, "scenario.val_per_class=5"])) == 860
    photos = load_config("lucir-imagenet-subset", ["name=my-photos"])
    assert nominal_size(photos) is None and images_per_seed(photos) is None
    assert compute_text(photos, 3) == "images: unknown (no published size of data.name 'imagefolder')"


def test_a_config_without_a_target_and_an_unknown_name_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 41 item 3: a packaged config without a ``paper:`` figure (cilkit's own protocol, or a
    paper's whose figure was not found) and a config file without one are refused in one line
    naming it and ``cilkit reproduce --list``; an unknown name lists the paper configs; nothing runs."""
    for name in ("cifar100-b0-10", "ssil-cifar100-b0-10", str(tiny_paper_config(tmp_path, paper=False))):
        assert main(["reproduce", name, "--seeds", "2"]) == 2
        line = one_error_line(capsys)
        assert f"config '{name}'" in line and "no 'paper:' target" in line and "cilkit reproduce --list" in line
        assert ("no figure reported for this protocol was found" in line) == (name == "ssil-cifar100-b0-10")
    assert main(["reproduce", "lucir-cifar100-b50-5step"]) == 2
    line = one_error_line(capsys)
    assert "unknown paper config 'lucir-cifar100-b50-5step'" in line and "did you mean 'lucir-cifar100-b50-5steps'" in line
    assert all(name in line for name in paper_configs_by_hand())
    assert main(["reproduce", "lucir-cifar100-b50-5steps", "--set", "runs=4"]) == 2
    assert "--seeds N" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()
