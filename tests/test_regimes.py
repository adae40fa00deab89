"""docs/regimes.md: every method's Fashion-MNIST config follows the one rule that carries its
authors' CIFAR-100 regime to the protocol (s = 5/160). The expected values are recomputed here
from the CIFAR-100 configs by the rule as the page states it; a config edited off the rule, or a
CIFAR-100 config changed without its Fashion-MNIST twin, fails here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

import cilkit

CONFIGS = Path(cilkit.__file__).parent / "configs"
S = 5 / 160  # the protocol's 5 epochs of fine-tuning for the 160 of configs/cifar100-b0-10.yaml
PROTOCOL_LR = 0.05

# the configs of the methods compared on the protocol (the long-tailed and active protocols are
# protocols of their own, docs/regimes.md "What the rule does not carry")
METHOD_CONFIGS = ["der", "eeil", "foster", "gdumb", "lwf", "memo", "podnet", "scail", "ssil", "wa"]
AUTHORS = {m: f"{m}-cifar100-b0-10" for m in METHOD_CONFIGS} | {"podnet": "podnet-cifar100-b50-10steps"}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


def scaled_epochs(epochs: int) -> int:
    return max(1, half_up(epochs * S))


def scaled_milestones(milestones: list[int], stage_epochs: int) -> list[int]:
    return [m for m in (half_up(x * S) for x in milestones) if 0 < m < stage_epochs]


def scaled_lr(stage_lr: float, main_lr: float) -> float:
    return PROTOCOL_LR * stage_lr / main_lr


def test_the_rules_rounding_by_hand() -> None:
    # the page's table: BiC 200 -> 6, x0.1 at 2, 4, 5; EEIL 30 -> 1, no milestone
    assert scaled_epochs(200) == 6 and scaled_milestones([60, 120, 160, 180], 6) == [2, 4, 5]
    assert scaled_epochs(30) == 1 and scaled_milestones([10, 20], 1) == []
    assert scaled_epochs(130) == 4 and scaled_epochs(20) == 1


@pytest.mark.parametrize("fm, authors, block, keys", [
    ("fashion-mnist", "bic-cifar100-b0-10", "bic", ("bias_epochs", "bias_lr", "bias_milestones")),
    ("eeil-fashion-mnist", "eeil-cifar100-b0-10", "eeil", ("finetune_epochs", "finetune_lr", "finetune_milestones")),
    ("der-fashion-mnist", "der-cifar100-b0-10", "der", ("retrain_epochs", "retrain_lr", "retrain_milestones")),
    ("podnet-fashion-mnist", "podnet-cifar100-b50-10steps", "podnet", ("finetune_epochs", "finetune_lr", None)),
])
def test_a_methods_own_stage_is_the_authors_scaled_by_s(fm: str, authors: str, block: str,
                                                        keys: tuple[str, str, str | None]) -> None:
    ours, theirs = load(fm), load(authors)
    epochs, lr, milestones = keys
    assert ours[block][epochs] == scaled_epochs(theirs[block][epochs])
    assert ours[block][lr] == pytest.approx(scaled_lr(theirs[block][lr], theirs["train"]["lr"]))
    if milestones is not None:
        assert ours[block][milestones] == scaled_milestones(theirs[block][milestones], ours[block][epochs])


def test_foster_compresses_for_the_authors_epochs_scaled_under_their_cosine() -> None:
    ours, theirs = load("foster-fashion-mnist"), load("foster-cifar100-b0-10")
    assert ours["foster"]["compression_epochs"] == scaled_epochs(theirs["foster"]["compression_epochs"])
    assert ours["foster"].get("compression_lr") is None and theirs["foster"]["compression_lr"] is None
    assert ours["train"]["schedule"]["type"] == theirs["train"]["schedule"]["type"] == "cosine"


def test_gdumb_takes_the_authors_steps_per_state_scaled_with_their_schedule_clipping_and_cutmix() -> None:
    ours, theirs = load("gdumb-fashion-mnist"), load("gdumb-cifar100-b0-10")
    k = ours["memory"]["total"]
    assert k == theirs["memory"]["total"] == 2000  # both memories full from state 0 on
    their_steps = theirs["train"]["epochs"] * k // theirs["train"]["batch_size"]  # 256 x 125 = 32,000
    assert their_steps == 32_000
    assert ours["train"]["epochs"] * k // ours["train"]["batch_size"] == their_steps * S == 1000
    assert ours["train"]["batch_size"] == theirs["train"]["batch_size"] == 16
    assert ours["train"]["lr"] == theirs["train"]["lr"] == PROTOCOL_LR
    assert ours["train"]["clip_grad_norm"] == theirs["train"]["clip_grad_norm"] == 10
    assert ours["train"]["schedule"] == theirs["train"]["schedule"]
    assert ours["train"]["schedule"]["type"] == "sgdr"
    assert ours["gdumb"] == theirs["gdumb"] == {"cutmix_prob": 0.5, "cutmix_alpha": 1.0}


HELD = {"epochs": 5, "batch_size": 128, "lr": PROTOCOL_LR, "momentum": 0.9, "weight_decay": 0.0005}
STEP = {"type": "multistep", "milestones": [4], "gamma": 0.1}


@pytest.mark.parametrize("method", [m for m in METHOD_CONFIGS if m != "gdumb"])
def test_the_protocol_holds_the_stage_that_learns_the_states_data(method: str) -> None:
    protocol, ours, theirs = load("fashion-mnist"), load(f"{method}-fashion-mnist"), load(AUTHORS[method])
    for part in ("data", "scenario", "model"):
        assert ours[part] == protocol[part], part
    assert ours["memory"] == (protocol["memory"] if method != "lwf" else {"total": 0})  # LwF keeps none
    assert {k: ours["train"][k] for k in HELD} == HELD
    shape = theirs["train"]["schedule"]["type"]
    if shape == "cosine":
        assert ours["train"]["schedule"] == {"type": "cosine"}
    else:  # a step schedule (ScaIL's plateau is its fine-tuning base's: fine-tuning's step)
        assert shape in ("multistep", "plateau")
        assert ours["train"]["schedule"] == STEP


def test_every_method_config_says_which_rule_and_file_it_follows() -> None:
    for method in METHOD_CONFIGS:
        text = (CONFIGS / f"{method}-fashion-mnist.yaml").read_text()
        header = text[:text.index("\nname:")]
        assert "docs/regimes.md" in header, method
        assert f"configs/{AUTHORS[method]}.yaml" in header or method == "scail", method
    assert "docs/regimes.md" in (CONFIGS / "fashion-mnist.yaml").read_text()


def test_the_five_class_protocol_differs_from_the_protocol_only_in_its_tasks() -> None:
    protocol, five = load("fashion-mnist"), load("fashion-mnist-b5-1step")
    assert five["scenario"] == {**protocol["scenario"], "initial": 5, "increment": 5}
    for part in ("data", "memory", "model", "train", "lucir", "bic"):
        assert five[part] == protocol[part], part
    assert five["ssil"] == load("ssil-fashion-mnist")["ssil"]
