"""PODNet against an independent transcription of the original's formulas (written here with
explicit loops over samples, channels and pixels, in float64), with the gradients; the state-1
step trains exactly what the original trains."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from cilkit.methods.podnet import nca_loss, pod_flat_loss, pod_spatial_loss
from cilkit.models.lsc import LocalSimilarityClassifier
from cilkit.run.loop import Run


# ----- transcriptions (from the paper's equations and the original's loss code) ----------------------
def pod_spatial_by_hand(old: list[torch.Tensor], new: list[torch.Tensor]) -> torch.Tensor:
    stage_losses = []
    for a, b in zip(old, new):
        n, c, h, w = a.shape
        per_sample = []
        for i in range(n):
            vectors = []
            for x in (a[i], b[i]):
                sq = x * x
                width_pooled = [sq[ch, row, :].sum() for ch in range(c) for row in range(h)]  # sum over W
                height_pooled = [sq[ch, :, col].sum() for ch in range(c) for col in range(w)]  # sum over H
                v = torch.stack(width_pooled + height_pooled)
                vectors.append(v / torch.sqrt((v * v).sum()))
            d = vectors[0] - vectors[1]
            per_sample.append(torch.sqrt((d * d).sum()))
        stage_losses.append(torch.stack(per_sample).mean())
    return torch.stack(stage_losses).mean()


def pod_flat_by_hand(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    rows = [1 - (o * f).sum() / torch.sqrt((o * o).sum() * (f * f).sum()) for o, f in zip(old, new)]
    return torch.stack(rows).mean()


def nca_by_hand(s: torch.Tensor, y: torch.Tensor, eta: torch.Tensor, delta: float) -> torch.Tensor:
    losses = []
    for i in range(s.shape[0]):
        z = [eta * (s[i, j] - (delta if j == y[i] else 0.0)) for j in range(s.shape[1])]
        m = torch.stack(z).max()  # not detached, as the original: the exp(0) term makes the loss depend on it
        numerator = z[y[i]] - m
        denominator = sum(torch.exp(z[j] - m) for j in range(s.shape[1]) if j != y[i]) + 1.0  # exp(0)
        losses.append(-(numerator - torch.log(denominator)))
    return torch.stack(losses).mean()


def lsc_by_hand(h: torch.Tensor, proxies: torch.Tensor, k: int, gamma: float, eta: torch.Tensor) -> torch.Tensor:
    rows = []
    for f in h:
        unit = f / torch.sqrt((f * f).sum())
        classes = []
        for c in range(proxies.shape[0] // k):
            sims = []
            for p in proxies[c * k:(c + 1) * k]:
                d = unit - p / torch.sqrt((p * p).sum())
                sims.append(-(d * d).sum())
            sims_t = torch.stack(sims)
            weights = torch.exp(gamma * sims_t) / torch.exp(gamma * sims_t).sum()
            classes.append((weights * sims_t).sum())
        rows.append(eta * torch.stack(classes))
    return torch.stack(rows)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def _grads(fn, leaves):
    for t in leaves:
        t.grad = None
    value = fn()
    value.backward()
    return value.detach(), [t.grad.clone() for t in leaves]


# ----- the differential tests -------------------------------------------------------------------------
def test_pod_spatial_matches_the_transcription_with_gradients():
    old = _leaves((3, 4, 5, 6), (3, 2, 3, 3), seed=1)
    new = _leaves((3, 4, 5, 6), (3, 2, 3, 3), seed=2)
    ours, g_ours = _grads(lambda: pod_spatial_loss(old, new), old + new)
    ref, g_ref = _grads(lambda: pod_spatial_by_hand(old, new), old + new)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6)
    # what the test would catch: the wrong pooling axes, no normalisation, a sum over stages
    a, b = old[0].detach(), new[0].detach()

    def variant(pool, normalise=True):
        x, y = pool(a.pow(2)), pool(b.pow(2))
        if normalise:
            x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
        return (x - y).norm(dim=1).mean()

    first = pod_spatial_by_hand([a], [b]).item()
    channels = variant(lambda x: x.sum(1).flatten(1))
    swapped = variant(lambda x: torch.cat([x.sum(2).flatten(1), x.sum(3).flatten(1)], 1))
    unnormalised = variant(lambda x: torch.cat([x.sum(3).flatten(1), x.sum(2).flatten(1)], 1), normalise=False)
    assert pod_spatial_loss([a], [b]).item() == pytest.approx(first, abs=1e-9)
    for wrong in (channels, unnormalised):
        assert abs(wrong.item() - first) > 1e-3
    assert swapped.item() == pytest.approx(first)  # the concatenation order is no part of the distance


def test_pod_flat_matches_the_transcription_with_gradients():
    old, new = _leaves((5, 7), (5, 7), seed=3)
    ours, g_ours = _grads(lambda: pod_flat_loss(old, new), [old, new])
    ref, g_ref = _grads(lambda: pod_flat_by_hand(old, new), [old, new])
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_ref))


@pytest.mark.parametrize("delta", [0.0, 0.6])
def test_nca_matches_the_transcription_with_gradients(delta):
    (s,) = _leaves((6, 5), seed=4)
    eta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    ours, g_ours = _grads(lambda: nca_loss(s, y, eta, delta), [s, eta])
    ref, g_ref = _grads(lambda: nca_by_hand(s, y, eta, delta), [s, eta])
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_ref))


def test_the_margin_acts_on_the_ground_truth_only():
    """Subtracting the margin from every similarity (the original's code) changes nothing after
    the max-subtraction; the paper's margin on the positive raises the loss."""
    (s,) = _leaves((6, 5), seed=5)
    s = s.detach()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    eta = torch.tensor(2.0, dtype=torch.float64)
    everywhere = nca_by_hand(s - 0.6, y, eta, 0.0)
    assert everywhere.item() == pytest.approx(nca_loss(s, y, eta, 0.0).item(), abs=1e-9)
    assert nca_loss(s, y, eta, 0.6).item() > everywhere.item() + 0.1


def test_lsc_logits_match_the_transcription_with_gradients():
    torch.manual_seed(0)
    head = LocalSimilarityClassifier(6, proxies_per_class=3, gamma=1.5).double()
    head.add_classes(2)
    head.add_classes(2)  # 2 old classes (frozen), 2 new
    with torch.no_grad():
        head.scale.fill_(1.3)
    (h,) = _leaves((4, 6), seed=6)
    proxies = torch.cat([head.weight_old, head.weight_new]).detach().requires_grad_(True)
    ours = head(h)
    ref = lsc_by_hand(h, proxies, 3, 1.5, head.scale)
    assert ours.shape == (4, 4) and head.num_classes == 4
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours = torch.autograd.grad(ours.sum(), [h, head.weight_new, head.scale])
    g_ref = torch.autograd.grad(ref.sum(), [h, proxies, head.scale])
    assert torch.allclose(g_ours[0], g_ref[0], atol=1e-6)
    assert torch.allclose(g_ours[1], g_ref[1][6:], atol=1e-6)  # the new proxies' gradient
    assert torch.allclose(g_ours[2], g_ref[2], atol=1e-6)
    assert not head.weight_old.requires_grad  # the old proxies are frozen


# ----- a state-1 step -----------------------------------------------------------------------------------
def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("finetune", [False, True])
def test_state_1_trains_what_the_original_trains(tmp_path, finetune):
    cfg = tiny_config(tmp_path, "method=podnet", "threads=1", "state0_cache=null", "train.epochs=1",
                      "podnet.proxies_per_class=2", f"podnet.finetune={str(finetune).lower()}",
                      "podnet.finetune_epochs=1", "scenario.states=2")
    run = Run(cfg, tmp_path / "r", progress=False)
    run.execute(until_state=0)
    before = _snapshot(run.model)
    ctx = run.context(1)
    run.method.before_state(ctx)
    imprinted = run.model.head.weight_new.detach().clone()
    assert torch.equal(run.model.head.weight_old, before["head.weight_new"])  # state 0's proxies frozen
    # imprinted proxies: norm of k-means centres of unit features times the old proxies' mean norm
    norm = before["head.weight_new"].norm(dim=1).mean()
    assert (imprinted.norm(dim=1) <= norm * (1 + 1e-5)).all() and (imprinted.norm(dim=1) > 0.1 * norm).all()
    run2 = Run(cfg, tmp_path / "r2", progress=False)
    results = run2.execute()
    after = _snapshot(run2.model)
    state0 = torch.load(tmp_path / "r2" / "checkpoints" / "state_01.pt", weights_only=False)["model"]
    assert before.keys() == {k for k in state0}  # the same architecture
    old_rows = after["head.weight_old"]
    assert torch.equal(old_rows, before["head.weight_new"]) != finetune  # finetuning trains the old proxies
    weights = [k for k in after if k.startswith("backbone.") and k.endswith("weight")]
    assert all(not torch.equal(after[k], before[k]) for k in weights[:2])  # the backbone trained
    assert after["head.scale"].item() != before["head.scale"].item()  # eta is learned
    own = results["states"][1]["podnet"]
    assert own["factor"] == pytest.approx(math.sqrt(7 / 3))
    history = [json.loads(s) for s in (tmp_path / "r2" / "history.jsonl").read_text().splitlines()]
    terms = [h["terms"] for h in history if h["kind"] == "epoch" and h["state"] == 2 and h["stage"] == "train"]
    assert terms and all(set(t) == {"nca", "pod"} and t["pod"] >= 0 for t in terms)
    assert ("finetune" in own) == finetune
