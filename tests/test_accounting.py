"""Memory-aligned accounting (issue 39 items 5 and 6): every state records the model's and the
memory's bytes; ``memory.budget_bytes`` is a budget the model and the exemplars share.

The expected figures are counted by hand from the architectures, never read from the code under
test. The tiny runs are on digits (one training image as stored: uint8 1x8x8 = 64 bytes) with
``convnet`` of width 8 and one input channel, whose state dict holds:

- conv weights (3x3, no bias): 1*8*9 + 8*8*9 + 8*16*9 + 16*16*9 = 72 + 576 + 1152 + 2304 = 4104;
- BatchNorm weight and bias: 2 * (8 + 8 + 16 + 16) = 96; parameters: 4104 + 96 = 4200;
- BatchNorm buffers: running mean and var, 2 * 48 = 96 float32, and 4 num_batches_tracked (int64);

so one backbone is 4200 * 4 + 96 * 4 + 4 * 8 = 17216 bytes = 269 digits images exactly. The
linear head over 16 features with ``c`` classes has ``17 c`` parameters (weight and bias).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import strip_timings, tiny_config

from cilkit.analysis.latex import table_latex
from cilkit.analysis.runsets import find_runs, group_runs, protocol_key
from cilkit.analysis.tables import build_table, state_table, table_csv
from cilkit.common.errors import UserError
from cilkit.data.base import TensorImages
from cilkit.models.backbones import resnet32
from cilkit.run.accounting import model_bytes, model_parameters, stored_image_bytes
from cilkit.run.loop import Run
from cilkit.settings.keys import Role, key_of

IMAGE = 64  # digits: uint8 1x8x8
BACKBONE_PARAMS = 4200
BACKBONE_BYTES = BACKBONE_PARAMS * 4 + 96 * 4 + 4 * 8  # 17216
FAST = ("train.epochs=1", "threads=1", "state0_cache=null", "memory.selection=random")


def finetune_model(classes: int) -> tuple[int, int]:
    """(parameters, bytes) of finetune's model with ``classes`` classes: one backbone, the head."""
    params = BACKBONE_PARAMS + 17 * classes
    return params, BACKBONE_BYTES + 17 * classes * 4


def grow_model(state: int, classes: int) -> tuple[int, int]:
    """(parameters, bytes) of grow_test's model after 0-based ``state``: from state 1 on two
    backbones, the head over their 32 features and an auxiliary head of 3 new + 1 "old" class
    over the new branch's 16 features (4 * 16 + 4 = 68 parameters)."""
    if state == 0:
        return finetune_model(classes)
    params = 2 * BACKBONE_PARAMS + 33 * classes + 68
    return params, params * 4 + 2 * (96 * 4 + 4 * 8)


def test_one_resnet32_weighs_about_603_cifar_images():
    """issue 39 item 5: Zhou et al. (ICLR 2023): one ResNet-32 (0.46M parameters, float32) is about
    603 CIFAR images (3x32x32 uint8, 3072 bytes). Counted by hand for option A shortcuts (no
    parameters): stem conv 3*16*9 = 432; stage 1: 10 convs 16*16*9 = 23040; stage 2: 16*32*9 +
    9 * 32*32*9 = 87552; stage 3: 32*64*9 + 9 * 64*64*9 = 350208; 31 BatchNorms over 1136
    channels: 2272 weights and biases, 2272 running statistics and 31 int64 counters."""
    params = 432 + 23040 + 87552 + 350208 + 2272
    assert params == 463504
    net = resnet32(shortcut="pad")
    assert model_parameters(net) == params
    assert model_bytes(net) == params * 4 + 2272 * 4 + 31 * 8  # buffers included
    cifar = TensorImages(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2))
    fashion = TensorImages(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2))
    assert stored_image_bytes(cifar) == 3072 and stored_image_bytes(fashion) == 784
    assert params * 4 // 3072 == 603  # the parameters alone: Zhou et al.'s 603
    assert model_bytes(net) / 3072 == pytest.approx(606.6, abs=0.05)  # with the BatchNorm buffers


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accounting")
    Run(tiny_config(root, *FAST), root / "ft", progress=False).execute()
    return root / "ft"


def test_every_state_records_the_model_and_the_memory(finetune_run):
    """issue 39 item 5: results.json's states[b]["accounting"]: the model's parameters and bytes
    (its state dict, buffers included), one image's bytes as stored, the memory's images and
    bytes, their sum and the model in exemplars; the budget is off by default."""
    results = json.loads((finetune_run / "results.json").read_text())
    for state, classes in zip(results["states"], (4, 7, 10)):
        params, size = finetune_model(classes)
        assert state["accounting"] == {
            "model_parameters": params, "model_bytes": size, "image_bytes": IMAGE,
            "memory_images": 60, "memory_bytes": 60 * IMAGE, "total_bytes": size + 60 * IMAGE,
            "model_in_exemplars": pytest.approx(size / IMAGE), "budget_bytes": None}
        assert state["memory_size"] == 60


def test_the_tables_show_the_last_states_accounting(finetune_run):
    """issue 39 item 5: table.md, table.csv and report.html show the last state's model MB, memory
    MB, total MB and model in exemplars (MB: 10^6 bytes); table.tex keeps its default columns and
    shows them when asked (--columns model_mb,memory_mb,total_mb,model_in_ex)."""
    tables = [build_table(p.groups) for p in group_runs(find_runs([finetune_run]))]
    size = finetune_model(10)[1]
    header = state_table(tables[0]).splitlines()[0]
    assert header.endswith("| time (s) | model MB | memory MB | total MB | model in ex. |")
    csv_lines = table_csv(tables).splitlines()
    keys, values = csv_lines[0].split(","), csv_lines[1].split(",")
    row = dict(zip(keys, values))
    assert float(row["last_model_mb"]) == pytest.approx(size / 1e6)
    assert float(row["last_memory_mb"]) == pytest.approx(60 * IMAGE / 1e6)
    assert float(row["last_total_mb"]) == pytest.approx((size + 60 * IMAGE) / 1e6)
    assert float(row["last_model_in_exemplars"]) == pytest.approx(size / IMAGE)  # 279.625
    assert "| 0.02 | 0.00 | 0.02 | 279.6 |" in state_table(tables[0])
    default = table_latex(tables)
    assert "model MB" not in default and "model in ex." not in default
    asked = table_latex(tables, columns=["mean_inc", "model_mb", "memory_mb", "total_mb", "model_in_ex"])
    assert "model MB & memory MB & total MB & model in ex." in asked and "279.6" in asked


def test_budget_bytes_keeps_fewer_exemplars_as_the_model_grows(tmp_path):
    """issue 39 item 6: under memory.budget_bytes = B the memory holds floor((B - model bytes) / 64)
    images after each state, the model as it is when the memory is filled. B = 36688 leaves 300
    images beside the state-1 model of both methods (17488 bytes). grow_test then adds a
    backbone (17216 bytes = 269 images), widens its head's 7 rows by 16 columns (448 bytes = 7
    images) and adds an auxiliary head (272 bytes): 300 -> 16 -> 10 images; finetune only widens
    its head (204 bytes a state): 300 -> 296 -> 293."""
    budget = 36688
    for method, sizes in (("finetune", [finetune_model(c)[1] for c in (4, 7, 10)]),
                          ("grow_test", [grow_model(b, c)[1] for b, c in enumerate((4, 7, 10))])):
        cfg = tiny_config(tmp_path, *FAST, f"method={method}", "memory.total=null", f"memory.budget_bytes={budget}")
        results = Run(cfg, tmp_path / method, progress=False).execute()
        expected = [(budget - size) // IMAGE for size in sizes]
        assert [s["memory_size"] for s in results["states"]] == expected
        assert [s["accounting"]["model_bytes"] for s in results["states"]] == sizes
        assert all(s["accounting"]["total_bytes"] <= budget and s["accounting"]["budget_bytes"] == budget
                   for s in results["states"])
        stored = json.loads((tmp_path / method / "memory" / "state_01.json").read_text())
        assert sum(len(ids) for ids in stored["exemplars"].values()) == expected[1]
    assert expected == [300, 16, 10]
    assert grow_model(1, 7)[1] - finetune_model(7)[1] == BACKBONE_BYTES + 7 * 16 * 4 + 68 * 4


def test_budget_bytes_refusals(tmp_path):
    """issue 39 item 6: one line each: a budget smaller than the model as built (before anything
    trains), a budget beside memory.total or memory.per_class (which of them would hold is
    ambiguous), LwF (which keeps no memory) under a budget, and a model that outgrows the budget
    in a later state (naming it)."""
    with pytest.raises(UserError, match=r"memory.budget_bytes .*17216 bytes") as e:
        Run(tiny_config(tmp_path, *FAST, "memory.total=null", "memory.budget_bytes=17000"), tmp_path / "small",
            progress=False)
    assert "\n" not in str(e.value)
    for other in ("memory.total=60", "memory.per_class=5"):
        with pytest.raises(UserError, match="memory.budget_bytes") as e:
            tiny_config(tmp_path, "memory.total=null", other, "memory.budget_bytes=40000")
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="method 'lwf' keeps no memory but memory.budget_bytes is 40000"):
        tiny_config(tmp_path, "method=lwf", "memory.total=null", "memory.budget_bytes=40000")
    budget = finetune_model(4)[1] + 100 * IMAGE  # 100 images in state 1; grow_test's state-2 model is larger
    cfg = tiny_config(tmp_path, *FAST, "method=grow_test", "memory.total=null", f"memory.budget_bytes={budget}")
    with pytest.raises(UserError, match=rf"state 2.*{grow_model(1, 7)[1]} bytes.*memory.budget_bytes") as e:
        Run(cfg, tmp_path / "grown", progress=False).execute()
    assert "\n" not in str(e.value)


def test_budget_bytes_is_a_protocol_key(tmp_path):
    """issue 39 item 6: memory.budget_bytes is a protocol key, so compare never puts a run that
    counts the model beside one that counts exemplars only; a run recorded before the key
    existed is of the default protocol (no budget)."""
    key = key_of("memory.budget_bytes")
    assert key.role is Role.PROTOCOL and key.resume == "keep"
    assert not key.state0  # the memory is filled after state 0 trains: a state-0 cache entry is shared
    plain = tiny_config(tmp_path, "memory.total=null").to_dict()  # the two differ in the budget alone
    aligned = tiny_config(tmp_path, "memory.total=null", "memory.budget_bytes=40000").to_dict()
    results = {"dataset": "digits", "class_order": list(range(10)), "state_ends": [4, 7, 10]}
    assert protocol_key(results, plain) != protocol_key(results, aligned)
    old = json.loads(json.dumps(plain))
    del old["memory"]["budget_bytes"]
    assert protocol_key(results, old) == protocol_key(results, plain)


def test_budget_bytes_resumed_run_is_the_uninterrupted_one(tmp_path):
    """issue 39 item 6: a run under memory.budget_bytes resumed after state 1 (the grown model
    rebuilt from its checkpoint) sizes the memory and records the accounting as the run that was
    never interrupted."""
    cfg = tiny_config(tmp_path, *FAST, "method=grow_test", "memory.total=null", "memory.budget_bytes=36688")
    full = Run(cfg, tmp_path / "full", progress=False).execute()
    Run(cfg, tmp_path / "cut", progress=False).execute(until_state=1)
    resumed = Run(cfg, tmp_path / "cut", progress=False).execute(resume=True)
    assert strip_timings(resumed) == strip_timings(full)
    assert [s["accounting"]["memory_images"] for s in resumed["states"]] == [300, 16, 10]
