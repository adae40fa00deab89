"""EEIL against transcriptions of the paper's losses (Castro et al., ECCV 2018, Eq. 1-2 and the
balanced fine-tuning of Sec. 4), written with explicit loops in float64 and checked with their
gradients; the balanced stage on a real state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_value_and_gradient, state_context, tiny_config, total

from cilkit.training.engine import Batch
from cilkit.common.errors import UserError
from cilkit.methods.base import freeze
from cilkit.methods.eeil import EEIL, BalancedStage, cross_distillation
from cilkit.run.loop import Run


def soft_ce_by_hand(z: torch.Tensor, t: torch.Tensor, cols: list[int], T: float) -> torch.Tensor:
    """mean_i -sum_{j in cols} softmax(t_i[cols] / T)_j log softmax(z_i[cols] / T)_j"""
    total = z.new_zeros(())
    for i in range(z.shape[0]):
        t_norm = sum(math.exp(float(t[i, j]) / T) for j in cols)
        z_norm = sum(torch.exp(z[i, j] / T) for j in cols)
        for j in cols:
            total = total - math.exp(float(t[i, j]) / T) / t_norm * torch.log(torch.exp(z[i, j] / T) / z_norm)
    return total / z.shape[0]


def ce_by_hand(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    total = z.new_zeros(())
    for i in range(z.shape[0]):
        total = total - torch.log(torch.exp(z[i, int(y[i])]) / sum(torch.exp(z[i, j]) for j in range(z.shape[1])))
    return total / z.shape[0]


def test_state_groups_are_the_classes_each_state_added(after_state_1):
    """The groups EEIL distils: the class ranges each state added (tiny protocol: 4 + 3 + 3)."""
    run, _ = after_state_1
    assert [run.scenario.state_range(s) for s in range(2)] == [range(0, 4), range(4, 7)]
    assert [run.scenario.state_range(2)] == [range(7, 10)]


@pytest.mark.parametrize("T", [2.0, 3.5])
def test_cross_distillation_is_one_softmax_per_old_state_with_its_gradient(T):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 9, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(6, 9, generator=g, dtype=torch.float64) * 2
    groups = [range(0, 3), range(3, 7)]
    ours = cross_distillation(z, teacher, groups, T)

    def by_hand(ref_z):
        return soft_ce_by_hand(ref_z, teacher, [0, 1, 2], T) + soft_ce_by_hand(ref_z, teacher, [3, 4, 5, 6], T)

    assert_value_and_gradient(ours, z, by_hand)
    # one softmax over all old classes is another loss: the groups are distilled separately
    assert not torch.allclose(by_hand(z.detach()), soft_ce_by_hand(z.detach(), teacher, list(range(7)), T))


@pytest.fixture(scope="module")
def after_state_1(tmp_path_factory):
    """An EEIL run (memory 60, 3 states of 4 + 3 + 3 classes) trained through state 1's first
    stage and its memory update: what the balanced stage starts from."""
    d = tmp_path_factory.mktemp("eeil")
    cfg = tiny_config(d, "method=eeil", "threads=1", "state0_cache=null", "train.epochs=1", "eeil.finetune_epochs=1")
    return state_context(cfg, d / "r", 1)


def test_the_balanced_stage_loss_adds_the_temporary_distillation_of_the_new_classes(after_state_1):
    """CE over the seen classes + KD of state 0's classes and of state 1's (new) classes, each a
    softmax of its own at T = 2, both from the model after the first stage (the authors' code
    recomputes every head's distillation labels with that model)."""
    run, ctx = after_state_1
    method: EEIL = run.method
    stage_teacher = freeze(copy.deepcopy(ctx.model))
    with torch.no_grad():  # make the stage teacher differ from the student and from the teacher
        for p in stage_teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    idx = ctx.state.train[:16]
    x, labels, _ = next(iter(ctx.dataset.train.batches(idx, 16, mean=ctx.mean, std=ctx.std, device=ctx.device)))
    with torch.no_grad():
        old_out, first_out = ctx.teacher(x), stage_teacher(x)
    stage = BalancedStage(method, stage_teacher)
    assert stage.teacher(ctx) is stage_teacher and method.teacher(ctx) is ctx.teacher  # what the engine runs
    batch = Batch(x=x, y=ctx.targets(labels), idx=idx, teacher=first_out)
    out = ctx.model(batch.x)
    ours = total(stage.loss(ctx, batch, out)).double()
    z = out["logits"].detach().double()
    old, first = old_out["logits"].double(), first_out["logits"].double()
    n_old, n_seen = ctx.state.n_old, ctx.state.n_seen
    ref = (ce_by_hand(z, batch.y) + soft_ce_by_hand(z, first, list(range(n_old)), 2.0)
           + soft_ce_by_hand(z, first, list(range(n_old, n_seen)), 2.0))
    assert torch.allclose(ours, ref, atol=1e-4)
    method.cfg = method.cfg.model_copy(update={"temporary_distillation": False})
    try:
        without = total(BalancedStage(method, stage_teacher).loss(ctx, batch, out)).double()
    finally:
        method.cfg = method.cfg.model_copy(update={"temporary_distillation": True})
    assert torch.allclose(without, ce_by_hand(z, batch.y) + soft_ce_by_hand(z, first, list(range(n_old)), 2.0),
                          atol=1e-4)
    first_batch = Batch(x=x, y=batch.y, idx=idx, teacher=old_out)
    first_stage = total(method.loss(ctx, first_batch, out)).double()  # no temporary term outside the balanced stage
    assert torch.allclose(first_stage, ce_by_hand(z, batch.y) + soft_ce_by_hand(z, old, list(range(n_old)), 2.0),
                          atol=1e-4)


def test_a_run_finetunes_on_a_balanced_memory_after_every_incremental_state(tmp_path):
    cfg = tiny_config(tmp_path, "method=eeil", "threads=1", "state0_cache=null", "eeil.finetune_epochs=2")
    res = Run(cfg, tmp_path / "r", progress=False).execute()
    assert res["complete"] and "eeil" not in res["states"][0]
    for b in (1, 2):
        stage = res["states"][b]["eeil"]["finetune"]
        assert stage["train_images"] == 60  # the whole memory: floor(60 / n_seen) per class + remainder
        assert math.isfinite(stage["final_loss"])
    without = Run(tiny_config(tmp_path, "method=eeil", "threads=1", "state0_cache=null", "eeil.finetune_epochs=0"),
                  tmp_path / "r0", progress=False).execute()
    assert without["states"][0]["top1"] == res["states"][0]["top1"]  # state 0: no balanced stage
    assert "eeil" not in without["states"][1]
    assert without["states"][1]["top1"] != res["states"][1]["top1"]  # the stage acted on the model


def test_the_balanced_stage_without_memory_is_refused_in_one_line(tmp_path):
    cfg = tiny_config(tmp_path, "method=eeil", "memory.total=0")
    with pytest.raises(UserError, match="eeil.finetune_epochs"):
        EEIL(cfg)
