"""LT-CIL's two-stage rebalancing (lt2stage): each component against an in-file transcription of
the authors' code (xialeiliu/Long-Tailed-CIL, ``LAS_utils.py`` and ``datasets/data_loader.py``)
on identical tensors, and end-to-end runs on a tiny long-tailed scenario."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import state_context, strip_timings, tiny_config
from scipy import stats

from cilkit.methods import lt2stage as lt
from cilkit.run.loop import Run


# ----- transcriptions of the authors' code (written for this test) -------------------------------
class TheirLWS(torch.nn.Module):
    """LearnableWeightScaling: a (1, C) parameter of ones times the logits."""

    def __init__(self, c):
        super().__init__()
        self.learned_norm = torch.nn.Parameter(torch.ones(1, c))

    def forward(self, x):
        return self.learned_norm * x


def their_smoothing(counts, head, tail, shape, power=None):
    """LabelAwareSmoothing.__init__ in numpy, over the classes' counts."""
    n = np.array(counts, dtype=np.float64)
    n1, nk = n.max(), n.min()
    if shape == "concave":
        return tail + (head - tail) * np.sin((n - nk) * np.pi / (2 * (n1 - nk)))
    if shape == "linear":
        return tail + (head - tail) * (n - nk) / (n1 - nk)
    if shape == "convex":
        return head + (head - tail) * np.sin(1.5 * np.pi + (n - nk) * np.pi / (2 * (n1 - nk)))
    return tail + (head - tail) * np.power((n - nk) / (n1 - nk), power)


def their_las_loss(x, target, smooth):
    """LabelAwareSmoothing.forward."""
    s = smooth[target]
    logprobs = F.log_softmax(x, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    return ((1.0 - s) * nll + s * (-logprobs.mean(dim=-1))).mean()


def their_sampler_epochs(labels, k, epochs, seed):
    """ClassAwareSampler with RandomCycleIter and class_aware_sample_generator (python ``random``),
    the same sampler object iterated ``epochs`` times."""
    rng = random.Random(seed)

    class Cycle:
        def __init__(self, data):
            self.data, self.i = list(data), len(data) - 1

        def __next__(self):
            self.i += 1
            if self.i == len(self.data):
                self.i = 0
                rng.shuffle(self.data)
            return self.data[self.i]

    classes = sorted(set(labels))
    cls_iter = Cycle(range(len(classes)))
    data_iters = [Cycle([i for i, y in enumerate(labels) if y == c]) for c in classes]
    out = []
    for _ in range(epochs):
        epoch, j, chunk = [], 0, None
        while len(epoch) < len(labels):
            if j >= k:
                j = 0
            if j == 0:
                it = data_iters[next(cls_iter)]
                chunk = [next(it) for _ in range(k)]
            epoch.append(chunk[j])
            j += 1
        out.append(epoch)
    return out


# ----- the learnable weight scaling --------------------------------------------------------------
def test_lws_forward_and_gradients_are_the_authors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    theirs, mine = TheirLWS(5), torch.nn.Parameter(torch.ones(5))
    with torch.no_grad():
        theirs.learned_norm.copy_(torch.rand(1, 5, generator=g) + 0.5)
        mine.copy_(theirs.learned_norm[0])
    z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    out_t, out_m = theirs(z1), lt.lws_logits(z2, mine)
    assert torch.allclose(out_t, out_m)
    F.cross_entropy(out_t, y).backward()
    F.cross_entropy(out_m, y).backward()
    assert torch.allclose(theirs.learned_norm.grad[0], mine.grad)
    assert torch.allclose(z1.grad, z2.grad)


# ----- label-aware smoothing ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["concave", "linear", "convex", "exp"])
def test_label_aware_smoothing_and_its_gradients_are_the_authors(shape):
    counts = [500, 120, 40, 20, 7]
    theirs = torch.from_numpy(their_smoothing(counts, 0.4, 0.1, shape, power=2.0)).float()
    mine = lt.smoothing_per_class(torch.tensor(counts), 0.4, 0.1, shape, 2.0)
    assert torch.allclose(mine, theirs, atol=1e-6)
    assert mine[0].item() == pytest.approx(0.4) and mine[-1].item() == pytest.approx(0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 4, 3, 0, 1])
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lt_, lm = their_las_loss(a, y, theirs), lt.label_aware_smoothing(b, y, mine)
    assert lm.item() == pytest.approx(lt_.item(), rel=1e-6)
    lt_.backward()
    lm.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_smoothing_ignores_classes_without_images_and_an_all_equal_set_gets_the_tail_value():
    mine = lt.smoothing_per_class(torch.tensor([0, 50, 10, 0]), 0.4, 0.1, "linear", 2.0)
    assert mine[1:3].tolist() == pytest.approx([0.4, 0.1])
    assert lt.smoothing_per_class(torch.tensor([8, 8]), 0.4, 0.1, "concave", 2.0).tolist() == pytest.approx([0.1, 0.1])


# ----- mixup --------------------------------------------------------------------------------------
def test_mixup_mixes_as_the_authors_and_draws_lambda_from_beta():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 4, 4, generator=g)
    mixed, perm, lam = lt.mixup_batch(x, 0.5, torch.Generator().manual_seed(5))
    assert sorted(perm.tolist()) == list(range(8))
    # mixup_data, given the same lam and index
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm, :])
    # the authors' mixup_criterion on a loss linear in the targets: lam * L(y_a) + (1 - lam) * L(y_b)
    gen = torch.Generator().manual_seed(9)
    lams = [lt.mixup_batch(x, 0.5, gen)[2] for _ in range(400)]
    assert stats.kstest(lams, stats.beta(0.5, 0.5).cdf).pvalue > 0.01
    assert lt.mixup_batch(x, 0.0, gen)[2] == 1.0


def test_stage2_mixes_in_the_engine_hook_and_its_loss_is_the_authors_mixup_criterion(tmp_path):
    """Stage 2's mixup goes through FitHooks.mix_inputs (the engine forwards the mixed images) and
    the loss is ``mixup_criterion``: lam * CE(lws * out, y_a) + (1 - lam) * CE(lws * out, y_b)."""
    _, ctx = state_context(_cfg(tmp_path, "finetune"), tmp_path / "run", 1)
    n = ctx.state.n_seen
    scales = torch.linspace(0.5, 1.5, n)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 1, 4, 4, generator=gen), torch.randint(n, (6,), generator=gen)
    off = lt.Stage2(ctx, lt.LT2StageConfig(), scales, ctx.state.train)
    batch = lt.Batch(x=x, y=y, idx=torch.arange(6))
    assert off.mix_inputs(ctx, batch) is batch  # mixup off: the batch itself, nothing drawn
    hooks = lt.Stage2(ctx, lt.LT2StageConfig(mixup_alpha=0.4), scales, ctx.state.train)
    hooks.mix_generator = torch.Generator().manual_seed(11)
    mixed = hooks.mix_inputs(ctx, batch)
    # the same draws, made by hand in mixup_data's order: lam, then the permutation
    expect_x, perm, lam = lt.mixup_batch(x, 0.4, torch.Generator().manual_seed(11))
    assert torch.equal(mixed.x, expect_x) and torch.equal(mixed.y_partner, y[perm]) and mixed.lam == lam
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(6))
    logits = torch.randn(6, n, generator=gen)
    their = TheirLWS(n)
    with torch.no_grad():
        their.learned_norm.copy_(scales[None])
    scaled = their(logits).detach()
    expected = (lam * F.cross_entropy(scaled, y) + (1 - lam) * F.cross_entropy(scaled, y[perm])).detach()
    got = hooks.loss(ctx, mixed, {"logits": logits})["ce"].detach()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(hooks.loss(ctx, batch, {"logits": logits})["ce"].detach()) == pytest.approx(
        float(F.cross_entropy(scaled, y)), rel=1e-6)


# ----- the class-aware sampler -------------------------------------------------------------------
def _structure(order, labels, k, n_classes):
    """(class of each visit, each visit's images) of one epoch, checking a visit is one class."""
    visits = [order[i: i + k] for i in range(0, len(order), k)]
    for v in visits:
        assert len({labels[i] for i in v}) == 1, "a visit mixes classes"
    return [labels[v[0]] for v in visits], visits


@pytest.mark.parametrize("source", ["ours", "theirs"])
def test_the_class_aware_draw_has_the_authors_structure(source):
    """Both samplers (the authors', transcribed, and ours) on the same long-tailed labels: an
    epoch has as many draws as images; k consecutive images per visit of a class; the classes
    visited equally often (within one) over the stage; a class's images each used once before
    any repeats."""
    counts, k, epochs = [23, 9, 6, 2], 4, 6  # 40 images: whole visits, so every drawn image is used
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    n = len(labels)
    if source == "theirs":
        orders = their_sampler_epochs(labels, k, epochs, seed=0)
    else:
        sampler = lt.ClassAwareSampler(torch.arange(n), torch.tensor(labels), k)
        gen = torch.Generator().manual_seed(0)
        orders = [lt.class_aware_order(sampler, n, gen).tolist() for _ in range(epochs)]
    assert all(len(o) == n for o in orders)
    streams: dict[int, list[int]] = {c: [] for c in range(len(counts))}
    visit_counts = np.zeros(len(counts), dtype=int)
    for o in orders:
        classes, visits = _structure(o, labels, k, len(counts))
        for c, v in zip(classes, visits):
            streams[c] += v
            visit_counts[c] += 1
    assert visit_counts.max() - visit_counts.min() <= 1
    for c, stream in streams.items():
        members = sorted(i for i, y in enumerate(labels) if y == c)
        full = len(stream) // counts[c] * counts[c]
        for start in range(0, full, counts[c]):  # each pass: every image of the class once
            assert sorted(stream[start: start + counts[c]]) == members, f"class {c} repeats before a full pass"
        assert len(set(stream[full:])) == len(stream[full:]) and set(stream) <= set(members)


def test_the_class_aware_draw_cycles_every_class_with_passes_in_fresh_orders():
    labels = torch.tensor([0] * 8 + [1] * 4)  # 12 images, visits of 2: no visit cut at an epoch's end
    sampler = lt.ClassAwareSampler(torch.arange(12) + 100, labels, 2)
    gen = torch.Generator().manual_seed(4)
    stream = torch.cat([lt.class_aware_order(sampler, 12, gen) for _ in range(30)])
    zeros = stream[stream < 108].tolist()
    passes = [zeros[i: i + 8] for i in range(0, len(zeros) - 7, 8)]
    assert all(sorted(p) == list(range(100, 108)) for p in passes)  # each pass uses every image once
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes
    # balanced: the rare class gets as many draws as the frequent one
    assert abs((stream >= 108).sum().item() - (stream < 108).sum().item()) <= 4


def test_our_draw_and_the_authors_have_the_same_per_epoch_class_histogram_law():
    """Statistically: the class counts of one epoch's draws, ours and the authors', over many
    seeds, have the same means (balanced) for a long-tailed label set."""
    counts, k = [30, 10, 3], 4
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    ours, theirs = [], []
    for s in range(60):
        sampler = lt.ClassAwareSampler(torch.arange(len(labels)), torch.tensor(labels), k)
        o = lt.class_aware_order(sampler, len(labels), torch.Generator().manual_seed(s)).tolist()
        ours.append(np.bincount([labels[i] for i in o], minlength=3))
        t = their_sampler_epochs(labels, k, 1, seed=s)[0]
        theirs.append(np.bincount([labels[i] for i in t], minlength=3))
    assert np.allclose(np.mean(ours, 0), np.mean(theirs, 0), atol=1.0)
    assert np.allclose(np.mean(ours, 0), len(labels) / 3, atol=1.0)


# ----- end to end -------------------------------------------------------------------------------
LT = ["scenario.imbalance.profile=longtail", "scenario.imbalance.ratio=10", "train.epochs=1", "threads=1",
      "lt2stage.epochs=2"]


def _cfg(tmp_path, base, *more, cache="null"):
    return tiny_config(tmp_path, "method=lt2stage", f"lt2stage.base={base}", *LT, f"state0_cache={cache}", *more)


@pytest.mark.parametrize("base", ["finetune", "lucir"])
def test_stage2_runs_to_the_end_and_trains_only_the_classifier_and_lws(tmp_path, base, monkeypatch):
    seen = []
    original = lt.LT2Stage.stage2

    def spy(self, ctx, scales, indices):
        before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        n_old = ctx.state.n_old
        result = original(self, ctx, scales, indices)
        after = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        seen.append((before, after, n_old, scales.clone(), result.clone()))
        return result

    monkeypatch.setattr(lt.LT2Stage, "stage2", spy)
    res = Run(_cfg(tmp_path, base), tmp_path / "run", progress=False).execute()
    assert res["complete"] and len(seen) == 3
    for b, (before, after, n_old, s0, s1) in enumerate(seen):
        backbone = [k for k in before if not k.startswith("head.")]
        assert backbone and all(torch.equal(before[k], after[k]) for k in backbone), "stage 2 moved the backbone"
        head = [k for k in before if k.startswith("head.")]
        assert any(not torch.equal(before[k], after[k]) for k in head), "stage 2 left the classifier alone"
        if base == "finetune":  # the old rows of the linear head stay (classifier: new)
            assert torch.equal(before["head.weight"][:n_old], after["head.weight"][:n_old])
            assert torch.equal(before["head.bias"][:n_old], after["head.bias"][:n_old])
        else:
            assert torch.equal(before["head.weight_old"], after["head.weight_old"])
        assert not torch.equal(s0, s1)  # the scales trained
        assert res["states"][b]["lt2stage"]["lws"] == pytest.approx(s1.tolist(), abs=1e-6)
        assert res["states"][b]["lt2stage"]["stage2"]["train_images"] > 0


def test_the_test_scores_read_the_lws_scales(tmp_path):
    run = Run(_cfg(tmp_path, "finetune"), tmp_path / "run", progress=False)
    res = run.execute(until_state=0)
    scores = np.load(tmp_path / "run" / "scores" / "state_00.npz")
    lws = np.array(res["states"][0]["lt2stage"]["lws"], dtype=np.float32)
    assert np.allclose(scores["scores"], scores["logits"] * lws, atol=1e-5)
    assert np.allclose(scores["scores_no_lws"], scores["logits"])


def test_resume_after_state_1_is_bit_identical_to_a_cold_run(tmp_path):
    cfg = _cfg(tmp_path, "lucir")
    cold = Run(cfg, tmp_path / "cold", progress=False).execute()
    cut = Run(cfg, tmp_path / "cut", progress=False).execute(until_state=0)
    assert not cut["complete"]
    resumed = Run(cfg, tmp_path / "cut", progress=False).execute(resume=True)
    assert strip_timings(resumed) == strip_timings(cold)


def test_the_state0_cache_is_the_bases_and_a_hit_gives_the_cold_numbers(tmp_path):
    cache = tmp_path / "cache"
    base_run = Run(tiny_config(tmp_path / "b", "method=lucir", *LT[:-1], f"state0_cache={cache}"), tmp_path / "base",
                   progress=False)
    base_run.execute(until_state=0)
    hit = Run(_cfg(tmp_path, "lucir", cache=cache), tmp_path / "hit", progress=False).execute()
    cold = Run(_cfg(tmp_path, "lucir"), tmp_path / "cold", progress=False).execute()
    assert hit["states"][0]["state0_cached"] is True
    assert strip_timings(hit) == strip_timings(cold)


def test_info_lists_the_readings_chosen():
    from cilkit.describe import describe

    text = describe("lt2stage")
    assert "Readings chosen" in text and "lws_lr_factor" in text and "class-aware" in text
    assert math.isclose(lt.LT2StageConfig().lws_lr_factor, 10.0)


def test_the_stage2_schedule_is_the_authors_cosine_and_lws_trains_at_lr_over_the_factor(tmp_path):
    """adjust_learning_rate_stage_2: after epoch e, lr = 0.5 lr (1 + cos(e / E pi)) (heads); the
    LWS group at that over --lr-factor. The optimiser of stage 2 holds the new rows and sigma
    (LUCIR's heads[-1]) and the scales, nothing else."""
    epochs, lr = 4, 0.05
    run = Run(_cfg(tmp_path, "finetune", f"lt2stage.epochs={epochs}"), tmp_path / "run", progress=False)
    run.execute(until_state=0)
    lines = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines() if x.strip()]
    got = [x["lr"] for x in lines if x.get("stage") == "lt2stage"]
    theirs = [lr] + [0.5 * lr * (1 + math.cos(e / epochs * math.pi)) for e in range(1, epochs)]
    assert got == pytest.approx(theirs, rel=1e-9)
    _, ctx = state_context(_cfg(tmp_path / "l", "lucir"), tmp_path / "l" / "run", 1)
    hooks = lt.Stage2(ctx, lt.LT2StageConfig(), torch.ones(ctx.state.n_seen), ctx.state.train)
    groups = hooks.param_groups(ctx)
    head = ctx.model.head
    assert {id(p) for p in groups[0]["params"]} == {id(head.weight_new), id(head.sigma)}
    assert groups[1]["params"] == [hooks.lws] and groups[1]["lr"] == pytest.approx(ctx.fit.lr / 10)


@pytest.mark.parametrize("base, more", [
    ("eeil", ["eeil.finetune_epochs=1", "lt2stage.loss=las", "lt2stage.mixup_alpha=0.4"]),
    ("podnet", ["podnet.proxies_per_class=3", "podnet.finetune_epochs=1", "lt2stage.shape=convex",
                "lt2stage.loss=las", "lt2stage.classifier=all"]),
])
def test_the_other_bases_and_options_run_to_the_end(tmp_path, base, more):
    res = Run(_cfg(tmp_path, base, "scenario.states=2", *more), tmp_path / "run", progress=False).execute()
    assert res["complete"]
    terms = [json.loads(x).get("terms", {}) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()
             if x.strip() and json.loads(x).get("stage") == "lt2stage"]
    assert terms and all("las" in t for t in terms)
