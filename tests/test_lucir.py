"""LUCIR (Hou et al., CVPR 2019): the formulas, the split cosine head, and runs on digits."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from cilkit.run import state0cache
from cilkit.settings.config import load_config
from cilkit.common.errors import UserError
from cilkit.common.io import load_torch
from cilkit.methods.lucir import (
    imprinted_weights,
    less_forget_loss,
    less_forget_weight,
    margin_ranking_loss,
)
from cilkit.methods.nme import nme_scores
from cilkit.models import SplitCosineLinear
from cilkit.run.loop import Run

# ----- formulas ---------------------------------------------------------------------------------


def test_margin_ranking_loss_equals_the_hand_computed_value():
    cos = torch.tensor([
        [0.9, 0.1, 0.5, 0.7],   # old class 0: gt 0.9 vs new 0.7, 0.5 -> hinges 0.3, 0.1
        [0.2, 0.3, 0.6, -0.1],  # old class 1: gt 0.3 vs new 0.6, -0.1 -> hinges 0.8, 0.1
        [0.0, 0.1, 0.8, 0.2],   # a new-class sample: not ranked
    ])  # fmt: skip
    y = torch.tensor([0, 1, 3])
    got = margin_ranking_loss(cos, y, n_old=2, k=2, margin=0.5)
    assert got.item() == pytest.approx((0.3 + 0.1 + 0.8 + 0.1) / 4)  # mean over old samples x K
    # the same as torch's MarginRankingLoss over the (gt, top-k new) pairs, as the original code
    pairs_gt = torch.tensor([0.9, 0.9, 0.3, 0.3])
    pairs_new = torch.tensor([0.7, 0.5, 0.6, -0.1])
    ref = torch.nn.MarginRankingLoss(margin=0.5)(pairs_gt, pairs_new, torch.ones(4))
    assert got.item() == pytest.approx(ref.item())
    # no old-class sample in the batch -> 0; K larger than the new classes -> all of them
    assert margin_ranking_loss(cos[2:], y[2:], 2, 2, 0.5).item() == 0.0
    assert margin_ranking_loss(cos[:1], y[:1], 2, 5, 0.5).item() == pytest.approx(0.2)


def test_less_forget_loss_and_the_adaptive_lambda():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    prev = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert less_forget_loss(f, prev).item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 0.0) / 2)
    assert less_forget_weight(5.0, 50, 10) == pytest.approx(5.0 * math.sqrt(5.0))
    assert less_forget_weight(10.0, 50, 10, adaptive=False) == 10.0


def test_imprinted_rows_are_normalised_means_of_normalised_features_at_the_given_norm():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0], [5.0, 5.0]])
    classes = torch.tensor([0, 0, 1, 1])
    fallback = torch.full((3, 2), 7.0)  # class 2 has no image: keeps its row
    w = imprinted_weights(feats, classes, 2.5, fallback)
    s = 1 / math.sqrt(2)
    # class 0: mean of (1, 0) and (0, 1) -> direction (s, s); class 1: mean of (0,-1),(s,s)
    expected1 = F.normalize(torch.tensor([s / 2, (s - 1) / 2]), dim=0)
    assert torch.allclose(w[0], 2.5 * torch.tensor([s, s]))
    assert torch.allclose(w[1], 2.5 * expected1)
    assert torch.equal(w[2], fallback[2])


def test_nme_scores_pick_the_nearest_mean_and_skip_classes_without_one():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), float("nan")]])
    s = nme_scores(torch.tensor([[0.1, 3.0], [2.0, 0.5]]), means)
    assert s.argmax(1).tolist() == [1, 0] and torch.isinf(s[:, 2]).all()


# ----- the head ---------------------------------------------------------------------------------


def test_cosine_head_shares_one_sigma_and_freezes_the_old_rows():
    torch.manual_seed(0)
    head = SplitCosineLinear(5)
    head.add_classes(4)
    head.add_classes(3)
    assert head.num_classes == 7 and head.num_frozen == 4
    assert [n for n, _ in head.named_parameters()] == ["weight_old", "weight_new", "sigma"]
    assert not head.weight_old.requires_grad and head.weight_new.requires_grad
    assert head.sigma.item() == 1.0
    with torch.no_grad():
        head.sigma.fill_(3.0)
    f = torch.randn(6, 5)
    cos = F.normalize(f, dim=1) @ F.normalize(head.weight, dim=1).T
    assert torch.allclose(head(f), 3.0 * cos)  # old AND new columns scaled by the same sigma
    assert torch.allclose(head.cosine(f), cos) and cos.abs().max() <= 1.0


def test_cosine_head_state_dict_loads_into_a_head_grown_once():
    torch.manual_seed(0)
    head = SplitCosineLinear(5)
    head.add_classes(4)
    head.add_classes(3)
    fresh = SplitCosineLinear(5)
    fresh.add_classes(7)  # what the runner's resume does: one add_classes(total)
    fresh.load_state_dict(head.state_dict())
    assert fresh.num_frozen == 4 and torch.equal(fresh.weight, head.weight)
    assert not fresh.weight_old.requires_grad and fresh.weight_new.requires_grad
    fresh.add_classes(2)
    assert fresh.num_frozen == 7 and fresh.num_classes == 9


# ----- runs on digits ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lucir_run(tmp_path_factory):
    """One 3-state LUCIR run on digits with every checkpoint kept."""
    tmp = tmp_path_factory.mktemp("lucir")
    cfg = tiny_config(tmp, "method=lucir", keep_checkpoints="all")
    run = Run(cfg, tmp / "run", progress=False)
    results = run.execute()
    ckpts = [load_torch(tmp / "run" / "checkpoints" / f"state_{b:02d}.pt") for b in range(3)]
    return tmp, run, results, ckpts


def test_lucir_reports_cnn_as_primary_and_nme_as_a_variant(lucir_run):
    tmp, _, results, _ = lucir_run
    assert results["complete"] and results["primary_scores"] == "cnn"
    for b, s in enumerate(results["states"]):
        assert 0 <= s["variants"]["nme"]["top1"] <= 100
        npz = np.load(tmp / "run" / "scores" / f"state_{b:02d}.npz")
        assert np.array_equal(npz["scores"], npz["logits"])  # CNN = sigma * cos
        nme_acc = 100 * (npz["scores_nme"].argmax(1) == npz["labels"]).mean()
        assert nme_acc == pytest.approx(s["variants"]["nme"]["top1"])


def test_old_class_weights_do_not_change_in_later_states(lucir_run):
    _, _, _, ckpts = lucir_run
    heads = [c["model"] for c in ckpts]
    # the rows learned at state b are bit-identical at the end of state b+1
    assert heads[1]["head.weight_old"].shape[0] == 4
    assert torch.equal(heads[1]["head.weight_old"], heads[0]["head.weight_new"])
    prev = torch.cat([heads[1]["head.weight_old"], heads[1]["head.weight_new"]])
    assert torch.equal(heads[2]["head.weight_old"], prev)
    # ... while the backbone and the new rows did train
    key = next(k for k in heads[0] if k.startswith("backbone.") and k.endswith("weight"))
    assert not torch.equal(heads[0][key], heads[1][key])


def test_sigma_is_learned_and_lambda_follows_the_schedule(lucir_run):
    _, _, results, ckpts = lucir_run
    sigmas = [c["model"]["head.sigma"].item() for c in ckpts]
    assert sigmas[0] != 1.0 and sigmas[1] != sigmas[0] and sigmas[2] != sigmas[1]
    own = [s["lucir"] for s in results["states"]]  # the method's own results, under its name
    assert [s["sigma"] for s in own] == pytest.approx(sigmas)
    assert "lambda" not in own[0]
    assert own[1]["lambda"] == pytest.approx(5 * math.sqrt(4 / 3))
    assert own[2]["lambda"] == pytest.approx(5 * math.sqrt(7 / 3))
    history = [json.loads(s) for s in (lucir_run[0] / "run" / "history.jsonl").read_text().splitlines()]
    terms = [h["terms"] for h in history if h["kind"] == "epoch" and h["state"] == 2 and h["stage"] == "train"]
    lam = 5 * math.sqrt(4 / 3)  # the less-forget term enters the sum weighted by lambda (0 <= L_lf <= 2)
    assert terms and all(t["ce"] > 0 and 0 <= t["less_forget"] <= 2 * lam and t["margin_ranking"] >= 0 for t in terms)


def test_lucir_backbone_has_no_last_relu_and_its_own_state0_cache(lucir_run):
    _, run, _, _ = lucir_run
    out = run.engine.infer(run.model, run.dataset.test, run.scenario.state(0).test)
    assert (out["features"] < 0).any()  # with the last ReLU all features would be >= 0
    # the cosine head is in the state-0 cache key (the model's modules): no entry shared with finetune
    assert any(m.endswith("SplitCosineLinear") for m in state0cache.model_signature(run.model)["modules"])
    tmp = lucir_run[0]
    finetune = Run(tiny_config(tmp, "method=finetune"), tmp / "ft", progress=False)  # built, not run
    assert run.state0_entry() != finetune.state0_entry()


def test_imprinting_sets_new_rows_from_the_previous_model(lucir_run):
    tmp = lucir_run[0]  # same cache dir: state 0 comes from the cache
    run = Run(tiny_config(tmp, "method=lucir"), tmp / "imprint", progress=False)
    run.execute(until_state=0)
    ctx = run.context(1)
    old_rows = run.model.head.weight_new.detach().clone()
    run.method.before_state(ctx)
    head = run.model.head
    assert torch.equal(head.weight_old, old_rows)
    feats = F.normalize(run.engine.train_features(ctx.teacher, ctx.state.train), dim=1)
    pos = run.scenario.train_pos[ctx.state.train]
    norm = old_rows.norm(dim=1).mean()
    for j, c in enumerate(ctx.state.new):
        direction = F.normalize(feats[pos == c].mean(0), dim=0)
        assert torch.allclose(head.weight_new[j], direction * norm, atol=1e-5)
        assert head.weight_new[j].norm().item() == pytest.approx(norm.item(), rel=1e-5)


def test_balanced_finetuning_trains_only_the_class_rows(lucir_run):
    tmp, _, _, ckpts = lucir_run
    cfg = tiny_config(tmp, "method=lucir", "lucir.cbf=true", "lucir.cbf_epochs=2", keep_checkpoints="all")
    res = Run(cfg, tmp / "cbf", progress=False).execute(until_state=1)
    after = load_torch(tmp / "cbf" / "checkpoints" / "state_01.pt")["model"]
    before = ckpts[1]["model"]  # the same state 1 without the finetuning
    for k, v in before.items():
        if k.startswith("backbone."):  # weights AND batch-norm statistics unchanged
            assert torch.equal(after[k], v), k
    assert torch.equal(after["head.sigma"], before["head.sigma"])
    assert not torch.equal(after["head.weight_old"], before["head.weight_old"])
    assert not torch.equal(after["head.weight_new"], before["head.weight_new"])
    assert res["states"][1]["lucir"]["cbf"]["train_images"] == res["states"][1]["memory_size"]


def test_balanced_finetuning_without_memory_is_a_user_error(tmp_path):
    cfg = tiny_config(tmp_path, "method=lucir", "lucir.cbf=true", "memory.total=0")
    with pytest.raises(UserError, match="lucir.cbf"):
        Run(cfg, tmp_path / "r", progress=False)


@pytest.mark.parametrize(
    "name", ["lucir-cifar100-b50-5steps", "lucir-cifar100-b50-10steps", "lucir-imagenet-subset"]
)
def test_lucir_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.method == "lucir" and cfg.memory.per_class == 20 and cfg.memory.selection == "herding"
    opts = cfg.method_options("lucir")
    assert opts["lambda_base"] == (10.0 if "imagenet" in name else 5.0)
    assert opts["cbf"] == ("imagenet" in name)
