"""The engine owns the step: the optimiser of the fit's spec, the teacher's forward (once per
batch, no gradient), the sum of a loss's named terms and their epoch means, gradient clamping
and clipping, and a fit over cached rows (BiC's bias layer). Expected values are computed by
hand here, with plain torch, never by the engine."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cilkit.settings.config import ScheduleConfig, TrainConfig
from cilkit.data.base import Rows
from cilkit.training.engine import Engine, make_optimizer, summed_terms
from cilkit.training.protocol import Batch, FitHooks, FitSpec
from cilkit.run.loop import Run

from helpers import tiny_config

CONSTANT = ScheduleConfig(type="constant")


class Linear2(torch.nn.Module):
    """A model over rows that returns its logits alone (what a fit over Rows allows)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def _ctx(model: torch.nn.Module):
    return SimpleNamespace(model=model, generator=torch.Generator().manual_seed(0), targets=lambda y: y)


def _engine() -> Engine:
    return Engine(dataset=None, eval_batch_size=64, device=torch.device("cpu"),  # type: ignore[arg-type]
                  mean=torch.zeros(1), std=torch.ones(1), progress=False)


class TwoTerms(FitHooks):
    """CE plus a weight penalty, as two named terms, and a teacher whose forward is counted."""

    def __init__(self, model: torch.nn.Module, teacher: torch.nn.Module | None = None) -> None:
        self.model, self._teacher, self.seen_teacher = model, teacher, []

    def param_groups(self, ctx):
        return [{"params": [self.model.weight]}]

    def teacher(self, ctx):
        return self._teacher

    def loss(self, ctx, batch: Batch, out):
        self.seen_teacher.append(None if batch.teacher is None else batch.teacher["logits"])
        return {"ce": F.cross_entropy(out["logits"], batch.y), "l2": 0.1 * (self.model.weight ** 2).sum()}


def _rows(n=12, d=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def test_summed_terms_add_in_order_and_a_bare_tensor_is_one_term():
    a, b, c = torch.tensor(1e8), torch.tensor(1.0), torch.tensor(-1e8)
    loss, terms = summed_terms({"a": a, "b": b, "c": c})
    assert loss.item() == ((a + b) + c).item() and list(terms) == ["a", "b", "c"]
    loss, terms = summed_terms(torch.tensor(2.5))
    assert loss.item() == 2.5 and list(terms) == ["loss"]
    with pytest.raises(ValueError):
        summed_terms({})


def test_a_fit_over_rows_is_plain_sgd_over_the_summed_terms_with_their_epoch_means():
    x, y = _rows()
    w0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    model = Linear2(w0)
    spec = FitSpec(epochs=2, lr=0.1, schedule=CONSTANT, momentum=0.0, weight_decay=0.0, batch_size=5)
    hooks = TwoTerms(model)
    fit = _engine().fit(_ctx(model), hooks, torch.arange(12), spec, model=model, data=Rows(x, y),
                        generator=torch.Generator().manual_seed(7))
    # by hand: the same shuffles from the same generator, SGD without momentum
    w = w0.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(7)
    epochs = []
    for _ in range(2):
        order = torch.randperm(12, generator=g)
        sums, n = {"ce": 0.0, "l2": 0.0}, 0
        for s in range(0, 12, 5):
            idx = order[s:s + 5]
            ce = F.cross_entropy(x[idx] @ w.t(), y[idx])
            l2 = 0.1 * (w ** 2).sum()
            (ce + l2).backward()
            with torch.no_grad():
                w -= 0.1 * w.grad
            w.grad = None
            sums["ce"] += ce.item() * idx.numel()
            sums["l2"] += l2.item() * idx.numel()
            n += idx.numel()
        epochs.append({k: v / n for k, v in sums.items()})
    assert torch.allclose(model.weight.detach(), w.detach(), atol=1e-6)
    for record, expected in zip(fit["epochs"], epochs):
        assert record.terms == pytest.approx(expected, rel=1e-5)
        assert record.loss == pytest.approx(expected["ce"] + expected["l2"], rel=1e-5)
    assert all(t is None for t in hooks.seen_teacher)  # no teacher asked for: none run


def test_the_teacher_runs_once_per_batch_without_gradient():
    x, y = _rows()
    model = Linear2(torch.zeros(2, 3))
    calls = []

    class Teacher(torch.nn.Module):
        def forward(self, inp):
            calls.append(torch.is_grad_enabled())
            return {"logits": inp[:, :2] * 2}

    hooks = TwoTerms(model, Teacher())
    spec = FitSpec(epochs=1, lr=0.1, schedule=CONSTANT, batch_size=5)
    _engine().fit(_ctx(model), hooks, torch.arange(12), spec, model=model, data=Rows(x, y))
    assert calls == [False, False, False]  # 3 batches, each once, no gradient
    assert all(t is not None and t.dtype == torch.float32 for t in hooks.seen_teacher)


@pytest.mark.parametrize("optimizer, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                            ("adamw", torch.optim.AdamW)])
def test_the_optimiser_is_the_specs(optimizer, cls):
    p = torch.nn.Parameter(torch.zeros(2))
    spec = FitSpec.of_state(TrainConfig(optimizer=optimizer, lr=0.3, momentum=0.5, weight_decay=0.01), 0)
    opt = make_optimizer([{"params": [p]}], spec)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["weight_decay"] == 0.01
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.5


def test_clamp_and_clip_limit_the_gradient_before_the_step():
    x = torch.tensor([[10.0, -10.0, 0.5]])
    y = torch.tensor([0])
    for kind, spec_kw in (("clamp", {"clamp_grad": 0.05}), ("clip", {"clip_grad_norm": 0.01})):
        model = Linear2(torch.zeros(2, 3))
        spec = FitSpec(epochs=1, lr=1.0, schedule=CONSTANT, momentum=0.0, weight_decay=0.0, batch_size=1, **spec_kw)

        class CE(FitHooks):
            def param_groups(self, ctx):
                return [{"params": [model.weight]}]

            def loss(self, ctx, batch, out):
                return {"ce": F.cross_entropy(out["logits"], batch.y)}

        _engine().fit(_ctx(model), CE(), torch.arange(1), spec, model=model, data=Rows(x, y))
        # by hand: the gradient of CE at W = 0 is (softmax - onehot) x^T = [[-0.5], [0.5]] x
        grad = torch.tensor([[-0.5], [0.5]]) * x
        if kind == "clamp":
            expected = -grad.clamp(-0.05, 0.05)
        else:
            expected = -grad * (0.01 / grad.norm())
        assert torch.allclose(model.weight.detach(), expected, atol=1e-6), kind


def test_every_epoch_line_of_the_history_carries_the_loss_terms(tmp_path):
    Run(tiny_config(tmp_path, "method=lucir", "threads=1", "state0_cache=null", "scenario.states=2"),
        tmp_path / "r", progress=False).execute()
    lines = [json.loads(s) for s in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    train = [h for h in lines if h["kind"] == "epoch" and h["stage"] == "train"]
    assert {tuple(h["terms"]) for h in train if h["state"] == 1} == {("ce",)}
    assert {tuple(h["terms"]) for h in train if h["state"] == 2} == {("ce", "less_forget", "margin_ranking")}
    for h in train:  # the terms add up to the epoch's loss
        assert sum(h["terms"].values()) == pytest.approx(h["loss"], rel=1e-5)


def test_the_configs_optimizer_and_clipping_reach_every_fit_of_a_run(tmp_path, monkeypatch):
    """One road from the config to the optimiser: train.optimizer and train.clip_grad_norm reach
    the state's fits and a method's extra stage (LUCIR's balanced finetuning) alike."""
    built = []
    real = make_optimizer

    def recording(groups, spec):
        built.append((spec.optimizer, spec.clip_grad_norm))
        return real(groups, spec)

    monkeypatch.setattr("cilkit.training.engine.make_optimizer", recording)
    cfg = tiny_config(tmp_path, "method=lucir", "lucir.cbf=true", "lucir.cbf_epochs=1", "train.optimizer=adamw",
                      "train.lr=0.001", "train.clip_grad_norm=5", "threads=1", "state0_cache=null",
                      "scenario.states=2")
    res = Run(cfg, tmp_path / "r", progress=False).execute()
    assert res["complete"]
    assert built == [("adamw", 5.0)] * 3  # state 1, state 2, state 2's balanced finetuning
