"""FOSTER (issue 39 items 2 and 4) against independent transcriptions of the authors' code
(G-U-N/PyCIL ``models/foster.py``: the effective-number weights of ``_train``, the boosting
loss of ``_feature_boosting``, ``BKD`` and ``_KD_loss``), on identical tensors with their
gradients, each comparison shown to fail on a deliberate mutation; the two-branch model; and a
run whose model stays one extractor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from cilkit.methods import foster
from cilkit.methods.foster import (FE_HEAD, BoostingStage, effective_number_weights,
                                   two_branch_model)
from cilkit.models import GrowingBackbone, build_model
from cilkit.run.loop import Run


# ----- transcriptions of PyCIL (numpy for the weights, torch for the losses) ------------------
def pycil_weights(cls_num_list: list[int], beta: float) -> torch.Tensor:
    effective_num = 1.0 - np.power(beta, cls_num_list)
    per_cls_weights = (1.0 - beta) / np.array(effective_num)
    per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
    return torch.FloatTensor(per_cls_weights)


def pycil_kd(pred: torch.Tensor, soft: torch.Tensor, T: float) -> torch.Tensor:
    pred = torch.log_softmax(pred / T, dim=1)
    soft = torch.softmax(soft / T, dim=1)
    return -1 * torch.mul(soft, pred).sum() / pred.shape[0]


def pycil_boosting(logits, fe_logits, old_logits, targets, per_cls_weights, lambda_okd, T):
    loss_clf = F.cross_entropy(logits / per_cls_weights, targets)
    loss_fe = F.cross_entropy(fe_logits, targets)
    loss_kd = lambda_okd * pycil_kd(logits[:, : old_logits.shape[1]], old_logits.detach(), T)
    return loss_clf + loss_fe + loss_kd


def pycil_bkd(pred, soft, per_cls_weights, T):
    pred = torch.log_softmax(pred / T, dim=1)
    soft = torch.softmax(soft / T, dim=1)
    soft = soft * per_cls_weights
    soft = soft / soft.sum(1)[:, None]
    return -1 * torch.mul(soft, pred).sum() / pred.shape[0]


COUNTS = [20] * 6 + [500, 480, 497, 500]  # 6 old classes at their memory share, 4 new ones
N_OLD = 6


def boosting_matches(seed: int, beta_ours: float = 0.96) -> bool:
    """Ours and PyCIL's boosting loss on the same logits: values and gradients equal."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(8, 10, generator=g, dtype=torch.float64)).requires_grad_(True)
    fe = (3 * torch.randn(8, 10, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = 3 * torch.randn(8, N_OLD, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    ours_w = effective_number_weights(torch.tensor(COUNTS), beta_ours).double()
    ours = sum(foster.boosting_loss(logits, fe, old, y, ours_w, 0.7, 2.0).values())
    ref_logits, ref_fe = logits.detach().clone().requires_grad_(True), fe.detach().clone().requires_grad_(True)
    ref = pycil_boosting(ref_logits, ref_fe, old, y, pycil_weights(COUNTS, 0.96).double(), 0.7, 2.0)
    assert isinstance(ours, torch.Tensor)
    ours.backward()
    ref.backward()
    assert logits.grad is not None and fe.grad is not None
    return (torch.allclose(ours, ref, atol=1e-6) and torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)
            and torch.allclose(fe.grad, ref_fe.grad, atol=1e-6))


def test_the_effective_number_weights_are_pycils():
    """issue 39 item 4: FOSTER's per-class weights ((1 - beta) / (1 - beta^n_c), scaled to sum
    to the classes) equal PyCIL's numpy computation, for beta1 and beta2; old classes, with fewer
    images, weigh more."""
    for beta in (0.96, 0.97, 0.5):
        ours = effective_number_weights(torch.tensor(COUNTS), beta)
        assert torch.allclose(ours, pycil_weights(COUNTS, beta), rtol=1e-6)
    w = effective_number_weights(torch.tensor(COUNTS), 0.96)
    assert float(w[:N_OLD].min()) > float(w[N_OLD:].max())


@pytest.mark.parametrize("seed", [0, 1])
def test_the_boosting_loss_is_pycils_with_its_gradients(seed):
    """issue 39 item 4: the boosting loss (CE of the logits divided by the beta1 weights + the fe
    head's CE + lambda KD of the old logits, T = 2) equals PyCIL's ``_feature_boosting`` loss, and
    so do the gradients of the logits and of the fe head's logits."""
    assert boosting_matches(seed)


def test_the_boosting_comparison_fails_on_a_mutation(monkeypatch):
    """issue 39 item 4: the comparison is not vacuous: ours with beta1 = 0.97 against PyCIL's
    0.96, or a KD scaled by T^2 (a common variant), makes it fail."""
    assert not boosting_matches(0, beta_ours=0.97)
    kd = foster.distillation_kl
    monkeypatch.setattr(foster, "distillation_kl", lambda s, t, T: T * T * kd(s, t, T))
    assert not boosting_matches(0)


def bkd_matches(seed: int, beta_ours: float, beta_ref: float) -> bool:
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(8, 10, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = 3 * torch.randn(8, 10, generator=g, dtype=torch.float64)
    ours = foster.balanced_kd(student, teacher, effective_number_weights(torch.tensor(COUNTS), beta_ours).double(), 2.0)
    ref_s = student.detach().clone().requires_grad_(True)
    ref = pycil_bkd(ref_s, teacher, pycil_weights(COUNTS, beta_ref).double(), 2.0)
    ours.backward()
    ref.backward()
    assert student.grad is not None
    return torch.allclose(ours, ref, atol=1e-6) and torch.allclose(student.grad, ref_s.grad, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_compression_loss_is_pycils_bkd_with_its_gradient(seed):
    """issue 39 item 4: the compression loss (the teacher's softmax at T times the beta2 weights,
    renormalised, against the student's log-softmax) equals PyCIL's ``BKD``, gradient included."""
    assert bkd_matches(seed, 0.97, 0.97)


def test_the_compression_comparison_fails_on_a_mutation(monkeypatch):
    """issue 39 item 4: other weights (beta 0.5) or an unweighted KD make the comparison fail."""
    assert not bkd_matches(0, 0.5, 0.97)
    monkeypatch.setattr(foster, "balanced_kd", lambda s, t, w, T: foster.distillation_kl(s, t, T))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    w = effective_number_weights(torch.tensor(COUNTS), 0.97)
    assert not torch.allclose(foster.balanced_kd(s, t, w, 2.0), pycil_bkd(s, t, pycil_weights(COUNTS, 0.97), 2.0),
                              atol=1e-4)


def test_the_two_branch_model_starts_as_the_previous_one():
    """issue 39 item 2: the boosting model holds the previous extractor (frozen, in eval) beside
    a new one with its weights (PyCIL loads them), a classifier over both whose old classes'
    logits are the previous model's, and an fe head over the new extractor for every class."""
    torch.manual_seed(0)
    previous = build_model("convnet", in_channels=1, image_size=8, width=8)
    previous.add_classes(4)
    previous.eval()
    x = torch.randn(5, 1, 8, 8)
    model = two_branch_model(previous, 3)
    model.train()
    assert isinstance(model.backbone, GrowingBackbone) and len(model.backbone.backbones) == 2
    old, new = model.backbone.backbones
    assert not any(p.requires_grad for p in old.parameters()) and not old.training
    assert all(p.requires_grad for p in new.parameters()) and new.training
    for a, b in zip(new.state_dict().values(), previous.backbone.state_dict().values()):
        assert torch.equal(a, b)
    model.eval()
    out = model(x)
    assert out["logits"].shape == (5, 7) and out["aux"][FE_HEAD].shape == (5, 7)
    assert torch.allclose(out["logits"][:, :4], previous(x)["logits"], atol=1e-6)
    assert previous.num_classes == 4 and previous.backbone is not model.backbone  # the previous model unchanged


def test_oofc_az_holds_the_new_rows_over_the_old_features_at_zero():
    """issue 39 item 2: ``oofc: az`` (PyCIL) zeroes the new classes' weights over the old
    extractor's features, and they stay zero after a step."""
    torch.manual_seed(0)
    previous = build_model("convnet", in_channels=1, image_size=8, width=8)
    previous.add_classes(4)
    model = two_branch_model(previous, 3)
    method = type("M", (), {"cfg": foster.FOSTERConfig(oofc="az")})()
    head = previous.head
    stage = BoostingStage(method, model, (head.weight.detach().clone(), head.bias.detach().clone()),  # type: ignore[arg-type]
                          torch.ones(7))
    stage.zero_new_old_block()
    d = head.weight.shape[1]
    with torch.no_grad():
        model.head.weight.add_(1.0)  # a step that moved them
    stage.after_step(None)  # type: ignore[arg-type]
    w = model.head.weight
    assert torch.equal(w[4:, :d], torch.zeros(3, d)) and bool((w[:4] != 0).any()) and bool((w[4:, d:] != 0).all())


def test_a_run_boosts_then_compresses_and_keeps_one_extractor(tmp_path):
    """issue 39 item 2: each incremental state trains the boosting stage (train.epochs epochs)
    then compression (foster.compression_epochs, no weight decay); the model the run keeps is one
    extractor: its parameters are fine-tuning's model's with the same classes."""
    cfg = tiny_config(tmp_path, "method=foster", "threads=1", "state0_cache=null", "foster.compression_epochs=3")
    run = Run(cfg, tmp_path / "r", progress=False)
    res = run.execute()
    assert res["complete"] and "foster" not in res["states"][0]
    for b in (1, 2):
        rec = res["states"][b]["foster"]
        assert rec["boosting"]["train_images"] > 0 and rec["weight_old"] > rec["weight_new"]
    stages = [(r["state"], r["stage"]) for r in map(json.loads, (tmp_path / "r" / "history.jsonl").open())
              if r["kind"] == "epoch"]
    assert stages.count((2, "feature boosting")) == 2 and stages.count((2, "train")) == 3
    plain = build_model("convnet", in_channels=1, image_size=8, width=8)
    plain.add_classes(10)
    assert run.model.architecture() == plain.architecture()
    assert [p.shape for p in run.model.parameters()] == [p.shape for p in plain.parameters()]


def pycil_weight_align(weights: torch.Tensor, old: int, increment: int, value: float) -> torch.Tensor:
    """``FOSTERNet.weight_align`` on a copy of ``weights``."""
    weights = weights.clone()
    newnorm = torch.norm(weights[-increment:, :], p=2, dim=1)
    oldnorm = torch.norm(weights[:-increment, :], p=2, dim=1)
    gamma = torch.mean(oldnorm) / torch.mean(newnorm) * (value ** (old / increment))
    weights[-increment:, :] *= gamma
    return weights


@pytest.mark.parametrize("value", [1.0, 0.9])
def test_teacher_and_student_weight_aligning_is_pycils(value, monkeypatch):
    """issue 39 item 4: ``teacher_wa`` / ``student_wa`` scale the new rows as PyCIL's
    ``weight_align`` (with ``wa_value``), the old rows and the bias untouched; a mutation (the
    factor without ``wa_value ** (n_old / n_new)``) differs when ``wa_value`` is not 1."""
    from cilkit.models import IncrementalLinear

    torch.manual_seed(0)
    head = IncrementalLinear(6)
    head.add_classes(7)
    before, bias = head.weight.detach().clone(), head.bias.detach().clone()
    gamma = foster.align_new_rows(head, 4, value)
    expected = pycil_weight_align(before, 4, 3, value)
    assert torch.allclose(head.weight, expected, atol=1e-6) and torch.equal(head.bias, bias)
    norms = before.norm(dim=1)
    assert abs(gamma - float(norms[:4].mean() / norms[4:].mean()) * value ** (4 / 3)) < 1e-5
    if value != 1.0:
        plain = foster.aligned_gamma
        monkeypatch.setattr(foster, "aligned_gamma", lambda w, n_old, v: plain(w, n_old, 1.0))
        head.weight.data.copy_(before)
        foster.align_new_rows(head, 4, value)
        assert not torch.allclose(head.weight, expected, atol=1e-6)
