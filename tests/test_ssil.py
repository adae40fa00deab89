"""SS-IL (Ahn et al., ICCV 2021) against an independent transcription of the authors' loss
(hongjoon0805/SS-IL-Official, trainer/ssil.py), written here with explicit loops over samples
and classes in float64, with the gradients; the ratio-preserving batches of a real run; state 0
equal to fine-tuning; runs on digits and a bit-exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import state_context, strip_timings, tiny_config, total

from cilkit.training.engine import Batch
from cilkit.common.errors import UserError
from cilkit.methods.ssil import SSIL, separated_softmax_ce, task_wise_kd
from cilkit.run.loop import Run

# tiny_config's scenario: 4 classes, then 3, then 3 -> the tasks of state 2 are classes 0-3 and 4-6
TASKS_OF_STATE_2 = [(0, 4), (4, 7)]


# ----- transcriptions of the original's loss --------------------------------------------------------
def separated_ce_by_hand(z: torch.Tensor, y: torch.Tensor, n_old: int) -> torch.Tensor:
    """Each image's cross-entropy under a softmax over its own group (old: 0..n_old-1, new:
    n_old..C-1), summed over the batch and divided by the batch size (reduction='sum' / B)."""
    total = z.new_zeros(())
    for i in range(z.shape[0]):
        group = range(0, n_old) if int(y[i]) < n_old else range(n_old, z.shape[1])
        log_sum = torch.log(sum(torch.exp(z[i, j]) for j in group))
        total = total + (log_sum - z[i, int(y[i])])
    return total / z.shape[0]


def task_kd_by_hand(s: torch.Tensor, t: torch.Tensor, tasks: list[tuple[int, int]], temp: float) -> torch.Tensor:
    """For each task: T^2 * mean over the batch of KL(p_teacher || p_student), the softmaxes at T
    over that task's classes only; summed over the tasks."""
    total = s.new_zeros(())
    for a, b in tasks:
        rows = []
        for i in range(s.shape[0]):
            zp = sum(torch.exp(t[i, j] / temp) for j in range(a, b))
            zq = sum(torch.exp(s[i, j] / temp) for j in range(a, b))
            kl = s.new_zeros(())
            for j in range(a, b):
                p = torch.exp(t[i, j] / temp) / zp
                q = torch.exp(s[i, j] / temp) / zq
                kl = kl + p * (torch.log(p) - torch.log(q))
            rows.append(kl)
        total = total + temp * temp * sum(rows) / len(rows)
    return total


# ----- the formulas on identical tensors ------------------------------------------------------------
def test_separated_softmax_ce_and_its_gradient_equal_the_transcription():
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(9, 7, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 5, 3, 6, 1, 4, 2, 6, 5])  # old (< 4) and new images mixed
    got = separated_softmax_ce(z, y, n_old=4)
    (grad,) = torch.autograd.grad(got, z)
    z2 = z.detach().clone().requires_grad_()
    want = separated_ce_by_hand(z2, y, 4)
    (grad_want,) = torch.autograd.grad(want, z2)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(grad, grad_want, rtol=1e-10, atol=1e-12)
    # no gradient crosses the groups: an old image's row moves the old logits only, and back
    assert torch.all(grad[y < 4][:, 4:] == 0) and torch.all(grad[y >= 4][:, :4] == 0)
    # a joint softmax over all 7 classes is another loss (what a mutation to it would compute)
    assert abs(got.item() - torch.nn.functional.cross_entropy(z, y).item()) > 1e-3
    # with no old class it is the plain cross-entropy (state 0)
    assert separated_softmax_ce(z, y, 0).item() == pytest.approx(separated_ce_by_hand(z2, y, 0).item(), rel=1e-12)


def test_task_wise_kd_and_its_gradient_equal_the_transcription():
    g = torch.Generator().manual_seed(1)
    s = (2 * torch.randn(6, 10, generator=g, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    got = task_wise_kd(s, t, [range(a, b) for a, b in TASKS_OF_STATE_2], 2.0)
    (grad,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_()
    want = task_kd_by_hand(s2, t, TASKS_OF_STATE_2, 2.0)
    (grad_want,) = torch.autograd.grad(want, s2)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(grad, grad_want, rtol=1e-10, atol=1e-12)
    assert torch.all(grad[:, 7:] == 0)  # the new classes' logits are not distilled
    # what the mutations would compute differs: all old classes at once; T = 1; no T^2
    assert abs(got.item() - task_kd_by_hand(s2, t, [(0, 7)], 2.0).item()) > 1e-3
    assert abs(got.item() - task_kd_by_hand(s2, t, TASKS_OF_STATE_2, 1.0).item()) > 1e-3
    assert abs(got.item() - want.item() / 4) > 1e-3


# ----- the method's loss in a real state ------------------------------------------------------------
@pytest.fixture(scope="module")
def state2(tmp_path_factory):
    """A digits run stopped after state 1, and the context of state 2 after before_state."""
    tmp = tmp_path_factory.mktemp("ssil-state2")
    cfg = tiny_config(tmp, "method=ssil", "threads=1", "state0_cache=null", "train.epochs=1")
    return state_context(cfg, tmp / "run", 2)


def test_the_methods_loss_in_state_2_equals_the_transcription_with_gradients(state2):
    run, ctx = state2
    assert [(r.start, r.stop) for r in run.method._tasks(ctx)] == TASKS_OF_STATE_2
    idx = torch.cat([ctx.state.train[:20], ctx.memory.indices(ctx.state.old)[:12]])
    x, labels, _ = next(iter(ctx.dataset.train.batches(idx, 64, mean=ctx.mean, std=ctx.std)))
    model, teacher = ctx.model.double(), ctx.teacher.double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the student as after some training: else it equals its teacher and KD is 0
        for p in model.parameters():
            p.add_(0.3 * p.std().nan_to_num() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    try:
        with torch.no_grad():
            teacher_out = teacher(x.double())
        batch = Batch(x=x.double(), y=ctx.targets(labels), idx=idx, teacher=teacher_out)
        assert int((batch.y < 7).sum()) == 12 and ctx.state.n_old == 7
        out = model(batch.x)
        got = total(run.method.loss(ctx, batch, out))
        t = teacher_out["logits"][:, :7]
        z = out["logits"]
        want = separated_ce_by_hand(z, batch.y, 7) + task_kd_by_hand(z, t, TASKS_OF_STATE_2, 2.0)
        params = [model.head.weight, model.head.bias, next(model.backbone.parameters())]
        g_got = torch.autograd.grad(got, params, retain_graph=True)
        g_want = torch.autograd.grad(want, params)
        assert got.item() == pytest.approx(want.item(), rel=1e-10)
        assert task_kd_by_hand(out["logits"], t, TASKS_OF_STATE_2, 2.0).item() > 1e-4  # KD is not trivially 0
        for a, b in zip(g_got, g_want):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    finally:
        model.float(), teacher.float()


# ----- runs on digits ---------------------------------------------------------------------------------
class RecordingSSIL(SSIL):
    """SS-IL that records every batch it trains on."""

    batches: list = []

    def loss(self, ctx, batch, out):
        RecordingSSIL.batches.append((ctx.state.index, batch.idx.cpu().clone(), batch.y.cpu().clone()))
        return super().loss(ctx, batch, out)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssil-run")
    cfg = tiny_config(tmp, "method=ssil", "threads=1", "state0_cache=null", "train.epochs=2")
    run = Run(cfg, tmp / "run", progress=False)
    run.method = RecordingSSIL(cfg)
    RecordingSSIL.batches = []
    results = run.execute()
    return run, results, list(RecordingSSIL.batches), tmp / "run"


def test_every_full_batch_holds_replay_per_batch_exemplars(recorded):
    run, results, batches, _ = recorded
    assert run.method.replay_per_batch == 64 // 5  # the default: a fifth of train.batch_size
    for b in (1, 2):
        st = run.scenario.state(b)
        state = [(idx, y) for s, idx, y in batches if s == b]
        full = [y for idx, y in state if idx.numel() == 64]
        assert len(full) >= 4 and all(int((y < st.n_old).sum()) == 12 for y in full)
        assert all(int((y < st.n_old).sum()) == 0 for idx, y in state if idx.numel() < 64)  # the leftover new images
        new_seen = torch.cat([idx[y >= st.n_old] for idx, y in state])
        assert new_seen.numel() == 2 * st.train.numel() and torch.unique(new_seen).numel() == st.train.numel()
        replayed = torch.cat([idx[y < st.n_old] for idx, y in state])
        assert not torch.isin(replayed, st.train).any() and replayed.numel() == 12 * len(full)
        images = sum(y.numel() for _, y in state)
        share = sum(int((y < st.n_old).sum()) for _, y in state) / images
        assert results["states"][b]["ssil"]["replay_share"] == pytest.approx(share)
    # state 0 is fine-tuning's shuffle: no replay, all images once per epoch
    state0 = torch.cat([idx for s, idx, _ in batches if s == 0])
    assert state0.numel() == 2 * run.scenario.state(0).train.numel()


def test_a_run_completes_with_its_records_and_the_lr_of_each_state(recorded):
    _, results, _, run_dir = recorded
    assert results["complete"] and len(results["states"]) == 3
    assert "ssil" not in results["states"][0]  # state 0: fine-tuning, nothing of its own
    for b, s in enumerate(results["states"]):
        assert s["top1"] > 2 * 100 / s["classes_seen"]  # well above chance
        if b == 0:
            continue
        own = s["ssil"]
        assert own["tasks_distilled"] == b and own["replay_per_batch"] == 12
        assert own["lr"] == pytest.approx(0.05 / (b + 1))
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    for line in history:  # the loss terms of every epoch: fine-tuning's CE in state 1, SS-IL's after
        if line["kind"] == "epoch":
            terms = line["terms"]
            assert set(terms) == ({"ce"} if line["state"] == 1 else {"separated_ce", "task_kd"})
            assert all(math.isfinite(v) and v >= 0 for v in terms.values())
    lrs = {line["state"]: line["lr"] for line in history if line["kind"] == "epoch" and line.get("epoch") == 1}
    assert lrs == pytest.approx({1: 0.05, 2: 0.025, 3: 0.05 / 3})  # the original's lr / (t + 1); 1-based


def test_state_0_is_fine_tunings_model(tmp_path):
    models = {}
    for name in ("finetune", "ssil"):
        cfg = tiny_config(tmp_path / name, f"method={name}", "threads=1", "state0_cache=null", "train.epochs=1")
        run = Run(cfg, tmp_path / name / "run", progress=False)
        run.execute(until_state=0)
        models[name] = run.model.state_dict()
    assert models["finetune"].keys() == models["ssil"].keys()
    assert all(torch.equal(models["finetune"][k], models["ssil"][k]) for k in models["ssil"])


def test_a_replay_that_leaves_no_new_image_is_refused(tmp_path):
    # that its options leave state 0 alone is trained and checked in tests/test_state0_free.py
    cfg = tiny_config(tmp_path, "method=ssil", "ssil.replay_per_batch=64", "threads=1")
    with pytest.raises(UserError, match="replay_per_batch"):
        SSIL(cfg)


@pytest.mark.parametrize("cut", [0, 1])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, cut):
    def config(d):
        return tiny_config(d, "method=ssil", "threads=1", "state0_cache=null", "train.epochs=1",
                           "ssil.replay_per_batch=16")

    full = Run(config(tmp_path / "a"), tmp_path / "a" / "run", progress=False).execute()
    partial = Run(config(tmp_path / "b"), tmp_path / "b" / "run", progress=False).execute(until_state=cut)
    assert len(partial["states"]) == cut + 1
    resumed = Run(config(tmp_path / "b"), tmp_path / "b" / "run", progress=False).execute(resume=True)
    assert resumed["complete"] and strip_timings(resumed) == strip_timings(full)
