"""WA (Weight Aligning) against transcriptions of the paper's formulas written with explicit loops
in float64: the loss (with its gradient, in both readings of the KD weight), gamma and
the aligned rows (Eq. 6-7), the weight clipping after every optimiser step; runs on digits that
record gamma, never leave a negative weight, match fine-tuning in state 0 where WA trains state 0
as fine-tuning does, and resume bit-exactly."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_value_and_gradient, strip_timings, tiny_config, total

from cilkit.methods.wa import WA, WAConfig, aligned_weights, wa_loss
from cilkit.models import IncrementalLinear
from cilkit.run.loop import Run

# ----- transcriptions ---------------------------------------------------------------------------


def loss_by_hand(z: torch.Tensor, y: torch.Tensor, old: torch.Tensor | None, T: float,
                 fixed: float | None) -> torch.Tensor:
    """(1 - n/(n+m)) CE + n/(n+m) KD (or CE + fixed * KD), KD = sum over the n old classes of
    -softmax(old / T)_k log softmax(z_old / T)_k, both terms averaged over the batch."""
    ce = z.new_zeros(())
    kd = z.new_zeros(())
    n_seen = z.shape[1]
    for i in range(z.shape[0]):
        norm = sum(torch.exp(z[i, j]) for j in range(n_seen))
        ce = ce - torch.log(torch.exp(z[i, int(y[i])]) / norm)
        if old is not None:
            n_old = old.shape[1]
            t_norm = sum(math.exp(float(old[i, k]) / T) for k in range(n_old))
            s_norm = sum(torch.exp(z[i, k] / T) for k in range(n_old))
            for k in range(n_old):
                kd = kd - math.exp(float(old[i, k]) / T) / t_norm * torch.log(torch.exp(z[i, k] / T) / s_norm)
    ce, kd = ce / z.shape[0], kd / z.shape[0]
    if old is None:
        return ce
    if fixed is not None:
        return ce + fixed * kd
    lam = old.shape[1] / n_seen
    return (1 - lam) * ce + lam * kd


def align_by_hand(w: torch.Tensor, n_old: int) -> tuple[list[list[float]], float]:
    """gamma = Mean(||W_1||..||W_n||) / Mean(||W_n+1||..||W_n+m||); new rows times gamma."""
    rows = w.tolist()
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
    gamma = (sum(norms[:n_old]) / n_old) / (sum(norms[n_old:]) / (len(rows) - n_old))
    return [row if c < n_old else [v * gamma for v in row] for c, row in enumerate(rows)], gamma


def _batch(seed: int = 0, n: int = 6, classes: int = 7, n_old: int = 4):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, classes, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(0, classes, (n,), generator=g)
    old = torch.randn(n, n_old, generator=g, dtype=torch.float64) * 3
    return z, y, old


# ----- the formulas -----------------------------------------------------------------------------


@pytest.mark.parametrize("T,fixed", [(2.0, None), (3.0, None), (2.0, 2.0)])
def test_loss_and_gradient_match_the_transcription(T, fixed):
    z, y, old = _batch()
    ours = total(wa_loss(z, y, old, T, fixed))
    assert_value_and_gradient(ours, z, lambda ref_z: loss_by_hand(ref_z, y, old, T, fixed))


def test_state0_loss_is_cross_entropy():
    z, y, _ = _batch(seed=1)
    assert torch.allclose(total(wa_loss(z, y, None, 2.0)), loss_by_hand(z, y, None, 2.0, None), atol=1e-12)


@pytest.mark.parametrize("n_old", [1, 4, 6])
def test_gamma_and_aligned_rows_match_the_transcription(n_old):
    w = torch.rand(9, 5, generator=torch.Generator().manual_seed(n_old), dtype=torch.float64) * torch.arange(
        1, 10, dtype=torch.float64)[:, None]  # rows of different norms
    rows, gamma = aligned_weights(w, n_old)
    ref_rows, ref_gamma = align_by_hand(w, n_old)
    assert float(gamma) == pytest.approx(ref_gamma, rel=1e-12)
    assert torch.allclose(rows, torch.tensor(ref_rows, dtype=torch.float64), atol=1e-12)


def _head_ctx(weight: torch.Tensor, state: int, n_old: int):
    head = IncrementalLinear(weight.shape[1])
    head.add_classes(weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
    st = SimpleNamespace(index=state, n_old=n_old, n_seen=weight.shape[0])
    return head, SimpleNamespace(model=SimpleNamespace(head=head), state=st, record=SimpleNamespace(results={}))


def test_after_state_aligns_the_head_in_place_and_records_gamma():
    w = torch.rand(7, 4, generator=torch.Generator().manual_seed(3)) * torch.arange(1, 8)[:, None]
    head, ctx = _head_ctx(w, state=1, n_old=3)
    WA(tiny_config_for_options(), WAConfig()).after_state(ctx)
    ref_rows, ref_gamma = align_by_hand(w.double(), 3)
    assert ctx.record.results["gamma"] == pytest.approx(ref_gamma, rel=1e-6)
    assert torch.allclose(head.weight.detach().double(), torch.tensor(ref_rows, dtype=torch.float64), atol=1e-5)
    assert ctx.record.results["min_weight"] == pytest.approx(float(w.min()))
    head2, ctx2 = _head_ctx(w, state=1, n_old=3)
    WA(tiny_config_for_options(), WAConfig(align=False)).after_state(ctx2)
    assert torch.equal(head2.weight.detach(), w) and ctx2.record.results["gamma"] is None


def tiny_config_for_options():
    return tiny_config(Path("/nonexistent"), "method=wa", "state0_cache=null")


def test_weights_are_clipped_after_every_step_and_not_before_the_first():
    """after_step, as the engine calls it after each optimiser step: the step, then the clamp;
    nothing is clamped before the first step (the first forward sees the initial weights)."""
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    head, ctx = _head_ctx(w, state=0, n_old=0)
    method = WA(tiny_config_for_options(), WAConfig())
    assert (head.weight < 0).any()
    opt = torch.optim.SGD([head.weight], lr=0.1)
    for _ in range(3):
        before = head.weight.detach().clone()
        opt.zero_grad()
        (head(torch.randn(8, 3)) ** 2).sum().backward()
        expected = (before - 0.1 * head.weight.grad).clamp(min=0)  # by hand: the step, then the clip
        opt.step()
        method.after_step(ctx)  # type: ignore[arg-type]
        assert torch.allclose(head.weight.detach(), expected, atol=1e-6)


def test_incremental_clipping_leaves_state0_alone():
    head, ctx = _head_ctx(-torch.ones(2, 3), state=0, n_old=0)
    method = WA(tiny_config_for_options(), WAConfig(clip="incremental"))
    method.after_step(ctx)  # type: ignore[arg-type]
    assert (head.weight < 0).all()
    head1, ctx1 = _head_ctx(-torch.ones(2, 3), state=1, n_old=1)
    method.after_step(ctx1)  # type: ignore[arg-type]
    assert (head1.weight == 0).all()


# ----- runs on digits ---------------------------------------------------------------------------


def _cfg(tmp_path, *extra):
    return tiny_config(tmp_path, "method=wa", "threads=1", "state0_cache=null", "train.epochs=2", *extra)


@pytest.fixture(scope="module")
def wa_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wa")
    run = Run(_cfg(tmp, "keep_checkpoints=all"), tmp / "run", progress=False)
    return tmp, run, run.execute()


def test_a_run_records_gamma_and_leaves_no_negative_weight(wa_run):
    from cilkit.common.io import load_torch

    tmp, run, results = wa_run
    assert results["complete"] and len(results["states"]) == 3
    assert "gamma" not in (results["states"][0].get("wa") or {})
    for b, n_old, n_seen in [(1, 4, 7), (2, 7, 10)]:
        s = results["states"][b]["wa"]
        assert s["lambda"] == pytest.approx(n_old / n_seen)
        assert s["gamma"] == pytest.approx(s["norm_old"] / s["norm_new"], rel=1e-6)
        assert 0 < s["gamma"] and s["gamma"] != 1.0
        assert s["min_weight"] >= 0.0  # clipped through the training
        assert results["states"][b]["top1"] > 100.0 / n_seen  # better than chance
    for b in range(3):  # after every training state, the aligned model too
        state = load_torch(tmp / "run" / "checkpoints" / f"state_{b:02d}.pt")["model"]
        assert state["head.weight"].min() >= 0.0
        assert torch.equal(state["head.bias"], torch.zeros_like(state["head.bias"]))  # no bias (the paper)
    # the last model's new rows have the old rows' mean norm (the alignment was the last change)
    norms = run.model.head.weight.detach().norm(dim=1)
    assert float(norms[7:].mean()) == pytest.approx(float(norms[:7].mean()), rel=1e-5)


def test_state0_is_fine_tuning_where_wa_trains_it_as_fine_tuning(tmp_path):
    """bias trained and no clipping in state 0: the state-0 model and scores of fine-tuning; the
    defaults (no bias, clipping) give another one."""
    def state0(name, *extra):
        d = tmp_path / name
        run = Run(tiny_config(tmp_path, *extra, "threads=1", "state0_cache=null", "train.epochs=2"), d,
                  progress=False)
        res = run.execute(until_state=0)
        return run.model.state_dict(), res["states"][0], np.load(d / "scores" / "state_00.npz")

    ft = state0("ft", "method=finetune")
    like = state0("wa-like", "method=wa", "wa.bias=true", "wa.clip=incremental")
    default = state0("wa", "method=wa")
    assert ft[0].keys() == like[0].keys()
    assert all(torch.equal(ft[0][k], like[0][k]) for k in ft[0])
    assert ft[1]["top1"] == like[1]["top1"] and np.array_equal(ft[2]["scores"], like[2]["scores"])
    assert not torch.equal(ft[0]["head.weight"], default[0]["head.weight"])


def test_resume_after_state_1_is_bit_exact(tmp_path, wa_run):
    _, _, full = wa_run
    cut = tmp_path / "cut"
    cfg = _cfg(tmp_path, "keep_checkpoints=all")
    partial = Run(cfg, cut, progress=False).execute(until_state=1)
    assert not partial["complete"]
    resumed = Run(cfg, cut, progress=False).execute(resume=True)
    assert strip_timings(resumed) == strip_timings(full)
