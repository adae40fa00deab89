"""DER (Yan et al., CVPR 2021) against independent transcriptions of the authors' code
(Rhyssiyan/DER-ClassIL.pytorch, ``inclearn/models/incmodel.py``) and of PyCIL's
(``models/der.py``, ``utils/inc_net.py``), on identical tensors with their gradients; the
expansion, the classifier learning and PyCIL's weight aligning on a real state; torchrun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import state_context, tiny_config, total

import cilkit.methods.der as der_module
from cilkit.common.errors import UserError
from cilkit.describe import describe
from cilkit.methods.der import DER, ClassifierLearning, balanced_subset, der_loss
from cilkit.run.loop import Run
from cilkit.settings.config import load_config
from cilkit.training.engine import Batch

QUICK = ["method=der", "threads=1", "state0_cache=null", "train.epochs=1", "der.retrain_epochs=1"]


# ----- transcriptions of the authors' code (not calling cilkit) --------------------------------
def pycil_loss(logits, aux_logits, targets, known_classes):
    """PyCIL ``DER._update_representation``: ``loss_clf + loss_aux``."""
    loss_clf = F.cross_entropy(logits, targets)
    aux_targets = targets.clone()
    aux_targets = torch.where(aux_targets - known_classes + 1 > 0, aux_targets - known_classes + 1, 0)
    loss_aux = F.cross_entropy(aux_logits, aux_targets)
    return loss_clf + loss_aux


def authors_loss(logits, aux_logits, targets, n_classes, task_size, aux_weight=1.0):
    """DER-ClassIL ``IncModel._compute_loss`` with ``aux_n+1`` (``loss_ce + loss_aux``, the
    auxiliary term times ``aux_weight``, 1 in their code)."""
    old_classes = targets < (n_classes - task_size)
    new_classes = targets >= (n_classes - task_size)
    loss = F.cross_entropy(logits, targets)
    aux_targets = targets.clone()
    aux_targets[old_classes] = 0
    aux_targets[new_classes] -= (n_classes - task_size) - 1
    return loss + aux_weight * F.cross_entropy(aux_logits, aux_targets)


def pycil_weight_align(weight, increment):
    """PyCIL ``DERNet.weight_align`` on a copy of the classifier's weight."""
    weights = weight.clone()
    newnorm = torch.norm(weights[-increment:, :], p=2, dim=1)
    oldnorm = torch.norm(weights[:-increment, :], p=2, dim=1)
    gamma = torch.mean(oldnorm) / torch.mean(newnorm)
    weights[-increment:, :] *= gamma
    return weights


def _tensors(n_old=5, n_new=4, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, n_old + n_new, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    aux = (torch.randn(n, n_new + 1, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.cat([torch.arange(n_old + n_new), torch.randint(0, n_old + n_new, (n - n_old - n_new,), generator=g)])
    return logits, aux, labels


def _ours_against(reference, aux_weight=1.0, n_old=5, n_new=4):
    """Our loss and the reference's on the same tensors: (values equal, gradients equal)."""
    logits, aux, labels = _tensors(n_old, n_new)
    ours = total(der_loss(logits, labels, aux, n_old, aux_weight))
    ours.backward()
    ref_logits, ref_aux = logits.detach().clone().requires_grad_(True), aux.detach().clone().requires_grad_(True)
    ref = reference(ref_logits, ref_aux, labels)
    ref.backward()
    return (torch.allclose(ours, ref, atol=1e-12),
            torch.allclose(logits.grad, ref_logits.grad, atol=1e-12) and torch.allclose(aux.grad, ref_aux.grad,
                                                                                         atol=1e-12))


def test_the_loss_is_pycils_and_the_authors_with_gradients_and_a_mutation_is_caught(monkeypatch):
    """issue 39 items 1 and 4 (DER): CE over the seen classes + CE of the auxiliary head whose
    targets map every old class to 0 and new class k to k - n_old + 1, weight 1: equal to
    PyCIL's and to the authors' computation, in value and in the gradients of both logit
    matrices; the authors' form with another weight equals ours with aux_weight; and the
    comparison fails when the target mapping is mutated (new class k to k - n_old)."""
    assert _ours_against(lambda z, a, y: pycil_loss(z, a, y, 5)) == (True, True)
    assert _ours_against(lambda z, a, y: authors_loss(z, a, y, 9, 4)) == (True, True)
    assert _ours_against(lambda z, a, y: authors_loss(z, a, y, 9, 4, 0.3), aux_weight=0.3) == (True, True)
    assert _ours_against(lambda z, a, y: authors_loss(z, a, y, 9, 4, 0.3)) != (True, True)  # the weight is read
    monkeypatch.setattr(der_module, "aux_targets",
                        lambda labels, n_old: torch.where(labels >= n_old, labels - n_old, torch.zeros_like(labels)))
    assert _ours_against(lambda z, a, y: pycil_loss(z, a, y, 5)) == (False, False)


def test_the_classifier_learning_loss_is_the_authors_cross_entropy_at_temperature_5():
    """issue 39 item 1 (DER): the classifier learning's loss is the authors'
    ``CrossEntropyLoss()(outputs / temperature, targets)``, gradient included; another
    temperature is another loss."""
    logits, _, labels = _tensors()
    ours = total(ClassifierLearning(5.0).loss(None, Batch(x=logits, y=labels, idx=labels), {"logits": logits}))
    ours.backward()
    ref_z = logits.detach().clone().requires_grad_(True)
    ref = torch.nn.CrossEntropyLoss()(ref_z / 5.0, labels)
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-12) and torch.allclose(logits.grad, ref_z.grad, atol=1e-12)
    other = total(ClassifierLearning(2.0).loss(None, Batch(x=logits, y=labels, idx=labels), {"logits": logits}))
    assert not torch.allclose(other, ref)


def test_the_balanced_subset_cuts_every_class_to_the_smallest_one_without_repeats():
    """issue 39 item 1 (DER): the authors' construct_balanced_subset: every class keeps as many
    images as the smallest class has, drawn from its own images, none twice; the same
    generator seed draws the same subset."""
    counts = {0: 7, 1: 3, 2: 11, 3: 5}
    positions = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    indices = torch.arange(100, 100 + positions.numel())
    chosen = balanced_subset(indices, positions, torch.Generator().manual_seed(1))
    assert chosen.numel() == 4 * 3 and chosen.unique().numel() == chosen.numel()
    for c in counts:
        mine = indices[positions == c]
        assert int(torch.isin(chosen, mine).sum()) == 3
    assert torch.equal(chosen, balanced_subset(indices, positions, torch.Generator().manual_seed(1)))


# ----- on a real state --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state_1(tmp_path_factory):
    """A DER run (memory 60, 3 states of 4 + 3 + 3 classes) trained through state 0, with state
    1's before_state done: two extractors and the auxiliary head."""
    d = tmp_path_factory.mktemp("der")
    return state_context(tiny_config(d, *QUICK), d / "r", 1)


def test_a_new_state_adds_an_extractor_from_the_previous_ones_weights_and_freezes_the_old(state_1):
    """issue 39 item 1 (DER): at state 1 the model holds two extractors; the old one takes no
    gradient and stays in eval mode in training; the new one starts as a copy of it (the
    authors' and PyCIL's load_state_dict) and trains; the classifier reads both extractors'
    features; the auxiliary head has n_new + 1 outputs over the new extractor's features."""
    run, ctx = state_1
    old, new = ctx.model.backbone.backbones
    assert all(not p.requires_grad for p in old.parameters()) and all(p.requires_grad for p in new.parameters())
    for k, v in old.state_dict().items():
        assert torch.equal(v, new.state_dict()[k]), k
    ctx.model.train()
    assert not old.training and new.training
    x, _, _ = next(iter(ctx.dataset.train.batches(ctx.state.train[:8], 8, mean=ctx.mean, std=ctx.std,
                                                  device=ctx.device)))
    ctx.model.eval()
    with torch.no_grad():
        out = ctx.model(x)
        f_old, f_new = old(x), new(x)
    assert ctx.model.head.weight.shape == (ctx.state.n_seen, f_old.shape[1] + f_new.shape[1])
    aux = ctx.model.aux_heads["der"].linear
    assert aux.out_features == ctx.state.n_new + 1
    assert torch.allclose(out["aux"]["der"], f_new @ aux.weight.T + aux.bias, atol=1e-6)


def test_the_method_loss_on_a_real_state_is_pycils(state_1):
    """issue 39 item 1 (DER): the loss hook on a real batch of state 1 (model outputs, the
    state's n_old) equals PyCIL's loss on the same logits and auxiliary logits."""
    run, ctx = state_1
    idx = torch.cat([ctx.state.train[:12], ctx.memory.indices(ctx.state.old)[:12]])
    x, labels, _ = next(iter(ctx.dataset.train.batches(idx, 24, mean=ctx.mean, std=ctx.std, device=ctx.device)))
    y = ctx.targets(labels)
    assert bool((y < ctx.state.n_old).any()) and bool((y >= ctx.state.n_old).any())
    out = ctx.model(x)
    ours = total(run.method.loss(ctx, Batch(x=x, y=y, idx=idx), out))
    ref = pycil_loss(out["logits"].detach(), out["aux"]["der"].detach(), y, ctx.state.n_old)
    assert torch.allclose(ours.detach(), ref, atol=1e-5)


def test_init_from_previous_false_starts_the_new_extractor_afresh(tmp_path):
    """issue 39 item 1 (DER): with init_from_previous false the new extractor is not a copy."""
    _, ctx = state_context(tiny_config(tmp_path, *QUICK, "der.init_from_previous=false"), tmp_path / "r", 1)
    old, new = ctx.model.backbone.backbones
    assert not all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items() if v.is_floating_point())


def test_classifier_learning_retrains_only_the_classifier_on_balanced_data(tmp_path):
    """issue 39 item 1 (DER): after state 1 trains, the classifier learning runs on as many
    images of every seen class as an old class has exemplars (memory 60 over 4 old classes:
    15, times 7 seen classes = 105), changes the classifier and leaves every extractor (weights
    and batch-norm statistics) and the auxiliary head as training left them."""
    run, ctx = state_context(tiny_config(tmp_path, *QUICK), tmp_path / "r", 1)
    ctx.record.results.clear()
    train_info, ctx = run._train(ctx)
    ctx = run._update_memory(ctx)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    run.method.after_state(ctx)
    after = ctx.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    stage = ctx.record.results["classifier"]
    assert stage["per_class"] == 60 // 4 and stage["train_images"] == 15 * 7


def test_align_is_pycils_weight_align_of_the_trained_classifier(tmp_path):
    """issue 39 item 1 (DER): classifier_stage align (PyCIL) scales the new classes' rows of
    the classifier that training left (the same run with classifier_stage none) as PyCIL's
    weight_align does; none leaves them."""
    def head_after_state_1(stage):
        cfg = tiny_config(tmp_path / stage, *QUICK, f"der.classifier_stage={stage}", "scenario.states=2")
        run = Run(cfg, tmp_path / stage / "r", progress=False)
        res = run.execute()
        return run.model.head.weight.detach(), res["states"][1]["der"]

    plain, plain_record = head_after_state_1("none")
    aligned, record = head_after_state_1("align")
    assert "classifier" not in plain_record and record["classifier"]["gamma"] > 0
    assert torch.allclose(aligned, pycil_weight_align(plain, 3), atol=1e-6)
    assert not torch.allclose(aligned, plain)


def test_der_needs_a_memory_and_names_the_pruning_it_does_not_implement():
    """issue 39 item 1 (DER): a run without memory is refused in one line; ``cilkit info der``
    says that the paper's channel-level masks and pruning are not implemented."""
    with pytest.raises(UserError, match="method 'der' needs a memory"):
        load_config(None, ["method=der", "memory.total=0"])
    info = describe("der")
    assert "Not implemented: the paper's channel-level mask and pruning" in info
    assert "der.classifier_stage" in info


@pytest.mark.slow
def test_torchrun_trains_the_grown_branches_in_the_wrapped_model(tmp_path):
    """issue 39 item 4 (DER): two processes under torchrun (gloo) run DER through 3 states; the
    checkpoint holds 3 extractors (2 frozen) and the auxiliary head, and the newest extractor
    moved away from the copy it started as (it trained inside DistributedDataParallel)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cilkit", "run",
           "--out", str(out), "--set", "method=der", "--set", "device=cpu",
           "--set", "threads=1", "--set", "state0_cache=null", "--set", "train.epochs=1",
           "--set", "der.retrain_epochs=1", "--set", "scenario.states=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["provenance"]["ranks"] == 2 and res["states"][2]["der"]["branches"] == 3
    ckpt = torch.load(sorted((out / "checkpoints").iterdir())[-1], weights_only=False)
    assert ckpt["architecture"]["branches"] == 3 and ckpt["architecture"]["frozen_branches"] == 2
    assert ckpt["architecture"]["aux_heads"]["der"]["out_dim"] == 2 + 1
    model = ckpt["model"]
    conv = [k for k in model if k.startswith("backbone.backbones.2.") and k.endswith("weight")][0]
    assert not torch.equal(model[conv], model[conv.replace("backbones.2.", "backbones.1.")])


def test_der_is_registered_as_its_own_state0():
    """issue 39 item 4 (DER): state 0 trains like fine-tuning but on a growing backbone whose
    parameters are named by branch, so DER does not claim fine-tuning's state-0 entries."""
    assert DER.state0_like(DER(load_config(None, ["method=der"]))) is None
