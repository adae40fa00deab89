"""DGR (He, CVPR 2024) against a transcription of the authors' per-batch computation
(JiangpengHe/imbalanced_cil ``src/approach/DGR.py`` ``train_epoch``, ``criterion``, ``criterionkd``,
``_DAKD``, ``measure_imbalance``, and ``incremental_learning.py`` ``train_loop``), written here
with the authors' structures (one linear head per task, numpy per-class lists, row-by-row
gradient writes) on identical tensors: the state's constants, the loss, and every gradient the
optimiser would step with, over consecutive batches (the accumulated norms carry over); then a
long-tailed run on digits that records the reweighting and resumes bit-exactly, and ``cilkit
info dgr``."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import strip_timings, tiny_config

from cilkit.describe import describe
from cilkit.methods.base import Batch
from cilkit.methods.dgr import DGR, DGRConfig
from cilkit.models import IncrementalLinear
from cilkit.run.loop import Run

# ----- the authors' computation, transcribed ----------------------------------------------------


def authors_entropy_ratio(removed) -> float:
    """measure_imbalance: normalised entropy of the removed counts plus 0.001."""
    r = np.asarray(removed, dtype=float) + 0.001
    q = r / np.sum(r)
    return float(-sum(v * np.log(v) for v in q) / np.log(len(r)))


def authors_dakd(pred, soft, removed, T):
    """_DAKD: prior = removed / sum, then / L2 norm; mix the logits by it; entropy-weighted sum
    of the two log-softmaxes against the teacher's softmax, summed and divided by the batch."""
    rat = authors_entropy_ratio(removed)
    prior = np.asarray(removed, dtype=float)
    prior = prior / np.sum(prior)
    prior = torch.FloatTensor(prior / np.linalg.norm(prior))
    mixed = pred * prior + soft * (1 - prior)
    p_final = rat * torch.log_softmax(pred / T, dim=1) + (1 - rat) * torch.log_softmax(mixed / T, dim=1)
    return -(torch.softmax(soft / T, dim=1) * p_final).sum() / pred.shape[0]


def authors_constants(num_per_cls, t):
    """train_loop (t > 0): removed samples of the old classes, gamma (gam = 1), kd_ratio (lambda_b = 0.7)."""
    removed, original, start = [], [], 0
    for i in range(t):
        end = len(num_per_cls[i])
        removed += (np.array(num_per_cls[i])[start:end] - np.array(num_per_cls[t])[start:end]).tolist()
        original += np.array(num_per_cls[i])[start:end].tolist()
        start = end
    n_new = sum(num_per_cls[t][len(num_per_cls[t - 1]):])
    n_seen = sum(original)
    return np.array(removed), original, np.exp(-(n_seen / (n_seen + n_new))), 0.7 * np.sqrt(n_seen / n_new)


def authors_step(backbone, heads, x, y, soft, num_per_cls, t, gradall):
    """One batch of train_epoch up to the optimiser step: the loss, then every gradient as the
    authors leave it (heads rewritten row by row). ``gradall`` (numpy) is updated in place."""
    f = backbone(x)
    outputs = [h(f) for h in heads]
    prior = np.array(num_per_cls[t]) / np.sum(np.array(num_per_cls[t]))
    loss_cn = F.cross_entropy(torch.cat(outputs, dim=1) + torch.log(torch.FloatTensor(prior)), y)
    params = [*backbone.parameters(), *(p for h in heads for p in h.parameters())]
    for p in params:
        p.grad = None
    if t == 0:
        loss_cn.backward()
        norms = []
        for h in heads:
            norms.extend(torch.norm(h.weight.grad, dim=1).numpy())
        gradall += np.array(norms)
        weight = np.min(gradall) / gradall
        k = 0
        for h in heads:
            for j in range(h.weight.shape[0]):
                h.weight.grad[j, :] = h.weight.grad[j, :] * weight[k + j]
                h.bias.grad[j] = h.bias.grad[j] * weight[k + j]
            k += h.weight.shape[0]
        return loss_cn
    removed, _, gamma, kd_ratio = authors_constants(num_per_cls, t)
    loss_kd = kd_ratio * 2 * 2 * authors_dakd(torch.cat(outputs[:-1], dim=1), soft, removed, 2)
    loss = loss_cn + loss_kd
    g_kd, b_kd, n_kd = [], [], []
    for h in heads[:-1]:
        g = torch.autograd.grad(loss_kd, h.weight, retain_graph=True)[0]
        n_kd.extend(torch.norm(g, dim=1).numpy())
        g_kd.append(g)
        b_kd.append(torch.autograd.grad(loss_kd, h.bias, retain_graph=True)[0])
    g_cn, b_cn, n_cn = [], [], []
    for h in heads:
        g = torch.autograd.grad(loss_cn, h.weight, retain_graph=True)[0]
        n_cn.extend(torch.norm(g, dim=1).numpy())
        g_cn.append(g)
        b_cn.append(torch.autograd.grad(loss_cn, h.bias, retain_graph=True)[0])
    gradall += np.array(n_cn)
    n_old = len(num_per_cls[t - 1])
    old, new = gradall[:n_old], gradall[n_old:]
    weight = np.array(list(np.min(old) / old) + list(np.min(new) / new))
    weight[:n_old] *= min(1.0, np.mean(new) / np.mean(old))
    weight[n_old:] *= min(1.0, np.mean(new) / np.mean(old) * gamma)
    ratio_kd = np.linalg.norm([weight[k] * n_cn[k] for k in range(len(n_cn))]) / np.linalg.norm(n_kd)
    loss.backward()
    k = 0
    for i, h in enumerate(heads):
        for j in range(h.weight.shape[0]):
            last = i == len(heads) - 1
            h.weight.grad[j, :] = weight[k + j] * g_cn[i][j, :] + (0 if last else ratio_kd * g_kd[i][j, :])
            h.bias.grad[j] = weight[k + j] * b_cn[i][j] + (0 if last else ratio_kd * b_kd[i][j])
        k += h.weight.shape[0]
    return loss


# ----- identical tensors ------------------------------------------------------------------------

NUM_PER_CLS = [[30, 12, 7], [5, 5, 5, 20, 9]]  # num_per_cls_task: 5 exemplars per old class


def _models(seed: int, task_sizes: list[int]):
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU())
    heads = [torch.nn.Linear(5, n) for n in task_sizes]
    ours_backbone = copy.deepcopy(backbone)
    head = IncrementalLinear(5)
    head.add_classes(sum(task_sizes))
    with torch.no_grad():
        head.weight.copy_(torch.cat([h.weight for h in heads]))
        head.bias.copy_(torch.cat([h.bias for h in heads]))
    return backbone, heads, ours_backbone, head


def _method(t: int, accumulated: np.ndarray) -> DGR:
    method = DGR(tiny_config(Path("/nonexistent"), "method=dgr", "state0_cache=null"), DGRConfig())
    learned = torch.tensor(authors_constants(NUM_PER_CLS, t)[1] if t else [], dtype=torch.int64)
    method.prepare(torch.tensor(NUM_PER_CLS[t]), learned, torch.device("cpu"))
    assert method.accumulated is not None
    method.accumulated.copy_(torch.tensor(accumulated))
    return method


@pytest.mark.parametrize("t", [0, 1])
def test_loss_and_every_gradient_match_the_authors_over_consecutive_batches(t):
    """Three batches (the accumulated norms carry over): the loss and the gradients of the
    backbone, the classifier's weight and bias, as the authors' train_epoch leaves them."""
    sizes = [3] if t == 0 else [3, 2]
    backbone, heads, ours_backbone, head = _models(t, sizes)
    gradall = np.array([0.4, 1.3, 0.2, 0.9, 0.5][: sum(sizes)])  # earlier steps of the state
    method = _method(t, gradall.copy())
    n_old = 3 if t else 0
    ctx = SimpleNamespace(state=SimpleNamespace(index=t, n_old=n_old, n_seen=sum(sizes)),
                          model=SimpleNamespace(head=head))
    g = torch.Generator().manual_seed(10 + t)
    for _ in range(3):
        x = torch.randn(8, 6, generator=g)
        y = torch.randint(0, sum(sizes), (8,), generator=g)
        soft = torch.randn(8, 3, generator=g) * 2 if t else None
        ref = authors_step(backbone, heads, x, y, soft, NUM_PER_CLS, t, gradall)
        for p in [*ours_backbone.parameters(), *head.parameters()]:
            p.grad = None
        f = ours_backbone(x)
        terms = method.loss(ctx, Batch(x=x, y=y, idx=torch.arange(8),  # type: ignore[arg-type]
                                       teacher={"logits": soft} if t else None), {"logits": head(f), "features": f})
        loss = sum(terms.values())
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        method.before_step(ctx)  # type: ignore[arg-type]
        assert torch.allclose(loss, ref, rtol=1e-5)
        assert torch.allclose(head.weight.grad, torch.cat([h.weight.grad for h in heads]), rtol=1e-4, atol=1e-7)
        assert torch.allclose(head.bias.grad, torch.cat([h.bias.grad for h in heads]), rtol=1e-4, atol=1e-7)
        for ours, theirs in zip(ours_backbone.parameters(), backbone.parameters()):
            assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-7)
        assert method.accumulated is not None
        assert np.allclose(method.accumulated.numpy(), gradall, rtol=1e-5)


def test_the_state_constants_are_the_authors_train_loop():
    removed, original, gamma, kd_ratio = authors_constants(NUM_PER_CLS, 1)
    method = _method(1, np.zeros(5))
    s = method.setup
    assert s is not None and s.n_old == 3
    assert s.gamma == pytest.approx(gamma, rel=1e-12) and s.kd_weight == pytest.approx(kd_ratio, rel=1e-12)
    assert s.rho == pytest.approx(authors_entropy_ratio(removed), rel=1e-12)
    p = removed / removed.sum()
    assert np.allclose(s.prior.numpy(), p / np.linalg.norm(p), rtol=1e-6)
    assert np.allclose(s.offsets.numpy(), np.log(np.array(NUM_PER_CLS[1]) / sum(NUM_PER_CLS[1])), rtol=1e-6)


def test_the_engine_calls_before_step_after_backward_and_before_clipping_and_the_step():
    """The hook DGR rewrites its gradients in: it sees this batch's gradient, what it writes is
    then clipped (train.clip_grad_norm) and stepped with. By hand: the CE gradient at W = 0 is
    [[-0.5], [0.5]] x; the hook flips its sign; the step is -lr * clip(-grad)."""
    from cilkit.data.base import Rows
    from cilkit.settings.config import ScheduleConfig
    from cilkit.training.engine import Engine
    from cilkit.training.protocol import FitHooks, FitSpec

    class Weight(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.t()

    model, seen = Weight(), []

    class Flip(FitHooks):
        def loss(self, ctx, batch, out):
            return {"ce": F.cross_entropy(out["logits"], batch.y)}

        def before_step(self, ctx):
            seen.append(model.weight.grad.clone())
            model.weight.grad.neg_()

    x, y = torch.tensor([[10.0, -10.0, 0.5]]), torch.tensor([0])
    spec = FitSpec(epochs=1, lr=1.0, schedule=ScheduleConfig(type="constant"), momentum=0.0, weight_decay=0.0,
                   batch_size=1, clip_grad_norm=0.01)
    engine = Engine(dataset=None, eval_batch_size=8, device=torch.device("cpu"),  # type: ignore[arg-type]
                    mean=torch.zeros(1), std=torch.ones(1), progress=False)
    ctx = SimpleNamespace(model=model, generator=torch.Generator().manual_seed(0), targets=lambda v: v)
    engine.fit(ctx, Flip(), torch.arange(1), spec, model=model, data=Rows(x, y))  # type: ignore[arg-type]
    grad = torch.tensor([[-0.5], [0.5]]) * x
    assert len(seen) == 1 and torch.allclose(seen[0], grad)
    assert torch.allclose(model.weight.detach(), grad * (0.01 / grad.norm()), atol=1e-6)


# ----- runs on digits ---------------------------------------------------------------------------


def _cfg(tmp_path, *extra):
    return tiny_config(tmp_path, "method=dgr", "threads=1", "state0_cache=null", "train.epochs=2",
                       "scenario.imbalance.profile=longtail", "scenario.imbalance.ratio=10", *extra)


@pytest.fixture(scope="module")
def dgr_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dgr")
    run = Run(_cfg(tmp), tmp / "run", progress=False)
    return tmp, run, run.execute()


def test_a_long_tailed_run_records_the_reweighting_of_its_training_counts(dgr_run):
    _, run, results = dgr_run
    assert results["complete"] and len(results["states"]) == 3
    per_class = run.scenario.imbalance["train_per_class"]
    for b, n_old, n_seen in [(1, 4, 7), (2, 7, 10)]:
        state = results["states"][b]
        rec = state["dgr"]
        assert math.isfinite(state["top1"]) and len(rec["class_weights"]) == n_seen
        assert all(0 < w <= 1 for w in rec["class_weights"])
        assert len(set(rec["class_weights"][:n_old])) == n_old  # the old classes' accumulated norms differ
        mem = rec["train_counts"][:n_old]
        assert rec["train_counts"][n_old:] == per_class[n_old:n_seen]  # every new image
        assert rec["lost"] == [per_class[c] - mem[c] for c in range(n_old)]  # the images the memory dropped
        n_learned, n_new = sum(per_class[:n_old]), sum(per_class[n_old:n_seen])
        assert rec["gamma"] == pytest.approx(math.exp(-n_learned / (n_learned + n_new)))
        assert rec["kd_weight"] == pytest.approx(0.7 * math.sqrt(n_learned / n_new))
        assert 0 < rec["imbalance"] <= 1
    assert results["states"][0]["dgr"]["train_counts"] == per_class[:4]


def test_resume_after_state_1_is_bit_exact(tmp_path, dgr_run):
    _, _, full = dgr_run
    cut = tmp_path / "cut"
    cfg = _cfg(tmp_path)
    partial = Run(cfg, cut, progress=False).execute(until_state=1)
    assert not partial["complete"]
    resumed = Run(cfg, cut, progress=False).execute(resume=True)
    assert strip_timings(resumed) == strip_timings(full)


def test_info_shows_the_description_and_options():
    info = describe("dgr")
    assert "Gradient Reweighting" in info and "Distribution-aware KD" in info
    for key in ("dgr.temperature", "dgr.lambda_b", "dgr.attenuation"):
        assert key in info
