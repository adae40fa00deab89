"""GDumb's training regime (issue 42): the SGDR schedule (``train.schedule.type: sgdr``) against a
transcription of the authors' epoch loop (drimpossible/GDumb ``src/main.py``) over torch's
``CosineAnnealingWarmRestarts``, CutMix against a transcription of their ``cutmix_data`` /
``rand_bbox`` (``src/utils.py``) given the same draws, the mixed loss by hand, and tiny GDumb runs
on digits (CutMix off = the run before it existed; on = a different, deterministic run)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from helpers import one_line_error, strip_timings, tiny_config, tiny_dict

from cilkit.methods.gdumb import beta_draw, cutmix
from cilkit.run.loop import Run
from cilkit.settings.config import ScheduleConfig, TrainConfig
from cilkit.training.engine import make_optimizer, make_scheduler
from cilkit.training.protocol import Batch, FitSpec

MAXLR, MINLR = 0.05, 0.0005


# ----- SGDR ------------------------------------------------------------------------------------------
def authors_lrs(epochs: int, maxlr: float = MAXLR, minlr: float = MINLR) -> list[float]:
    """The lr of every epoch as the authors' ``experiment`` sets it: torch's
    CosineAnnealingWarmRestarts(T_0=1, T_mult=2, eta_min=minlr) on SGD at maxlr; epoch 0 at
    maxlr * 0.1, epoch 1 at maxlr (set by hand), ``scheduler.step()`` from epoch 2 on."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=maxlr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=minlr)
    out = []
    for epoch in range(epochs):
        if epoch <= 0:
            for group in opt.param_groups:
                group["lr"] = maxlr * 0.1
        elif epoch == 1:
            for group in opt.param_groups:
                group["lr"] = maxlr
        else:
            scheduler.step()
        out.append(opt.param_groups[0]["lr"])
    return out


GDUMB_SCHEDULE = {"type": "sgdr", "warmup_epochs": 1, "warmup_factor": 0.1, "period": 1, "period_mult": 2,
                  "min_lr": MINLR}


def our_lrs(schedule: ScheduleConfig, epochs: int, lr: float = MAXLR) -> list[float]:
    """The lr of every epoch as the engine drives make_scheduler (read, then one step per epoch)."""
    cfg = TrainConfig(lr=lr, schedule=schedule)
    opt = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], FitSpec.of_state(cfg, 0))
    sched = make_scheduler(opt, cfg.schedule, epochs)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_sgdr_follows_the_authors_epoch_loop():
    expected = authors_lrs(20)
    assert our_lrs(ScheduleConfig(**GDUMB_SCHEDULE), 20) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the shape, read off the transcription: lr/10, then restarts at epochs 1, 2, 4, 8, 16
    assert [i for i, v in enumerate(expected) if v == pytest.approx(MAXLR)] == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("period,mult", [(3, 1), (2, 3)])
def test_sgdr_without_warmup_is_torchs_warm_restarts(period, mult):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=period, T_mult=mult, eta_min=0.01)
    expected = []
    for _ in range(15):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = our_lrs(ScheduleConfig(type="sgdr", period=period, period_mult=mult, min_lr=0.01), 15, lr=0.2)
    assert ours == pytest.approx(expected, rel=1e-12)


def test_the_sgdr_keys_leave_the_other_schedules_alone():
    """As milestones for a non-multistep type: read by sgdr only, ignored by the others."""
    for kind in ("constant", "multistep", "cosine"):
        plain = our_lrs(ScheduleConfig(type=kind, milestones=[3]), 8)
        assert our_lrs(ScheduleConfig(type=kind, milestones=[3], period=3, period_mult=1, warmup_epochs=2,
                                      warmup_factor=0.5, min_lr=0.01), 8) == plain


def out_of_range_error(tmp_path, capsys, *sets: str) -> str:
    """The one error line of a run of the tiny config with ``sets`` (KEY=VALUE)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path)))
    return one_line_error(capsys, ["run", str(path), "--out", str(tmp_path / "r"),
                                   *[a for kv in sets for a in ("--set", kv)]])


def test_an_sgdr_key_out_of_range_is_one_line_naming_it(tmp_path, capsys):
    err = out_of_range_error(tmp_path, capsys, "train.schedule.type=sgdr", "train.schedule.period=0")
    assert "train.schedule.period" in err


# ----- CutMix ------------------------------------------------------------------------------------------
def authors_cutmix(x: np.ndarray, y: np.ndarray, lam: float, index: np.ndarray, cx: int, cy: int):
    """``cutmix_data`` with its ``rand_bbox``, their random draws given (lam from the Beta, the
    permutation ``index``, the centre ``cx``, ``cy``); numpy throughout."""
    x = x.copy()
    size = x.shape
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H)
    y_a, y_b = y, y[index]
    x[:, :, bbx1:bbx2, bby1:bby2] = x[index, :, bbx1:bbx2, bby1:bby2]
    lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (x.shape[-1] * x.shape[-2]))
    return x, y_a, y_b, lam


@pytest.mark.parametrize("lam,cx,cy", [(0.3, 3, 4), (0.8, 0, 8), (0.05, 6, 0), (0.5, 5, 2), (0.999, 2, 2),
                                       (0.0, 3, 3)])
def test_cutmix_equals_the_authors_given_the_same_draws(lam, cx, cy):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 2, 7, 9, generator=g)  # rows != columns: the box's sides are per axis
    y = torch.tensor([4, 1, 0, 3, 2])
    perm = torch.tensor([2, 0, 4, 1, 3])
    mixed, partner, new_lam = cutmix(x, y, lam, perm, cx, cy)
    ex, _, ey_b, elam = authors_cutmix(x.numpy(), y.numpy(), lam, perm.numpy(), cx, cy)
    assert torch.equal(mixed, torch.from_numpy(ex))
    assert partner.tolist() == ey_b.tolist()
    assert new_lam == pytest.approx(float(elam), abs=1e-15)
    assert torch.equal(x, torch.randn(5, 2, 7, 9, generator=torch.Generator().manual_seed(7)))  # not changed


def test_cutmix_pastes_the_box_a_user_would_see():
    """By hand: 8 x 8 images of constant value i, lam 0.75 -> a side of int(8 * 0.5) = 4, centre
    (2, 5): rows 0..3, columns 3..6 come from the permuted image; lam = 1 - 16 / 64."""
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 8, 8).contiguous()
    mixed, partner, lam = cutmix(x, torch.tensor([0, 1, 2]), 0.75, torch.tensor([1, 2, 0]), 2, 5)
    expected = x.clone()
    expected[0, :, 0:4, 3:7], expected[1, :, 0:4, 3:7], expected[2, :, 0:4, 3:7] = 1.0, 2.0, 0.0
    assert torch.equal(mixed, expected) and partner.tolist() == [1, 2, 0] and lam == 0.75


def test_the_mixed_loss_is_lam_ce_plus_one_minus_lam_ce_by_hand(tmp_path):
    cfg = tiny_config(tmp_path, "method=gdumb", "threads=1", "state0_cache=null", "gdumb.cutmix_prob=1")
    run = Run(cfg, tmp_path / "r", progress=False)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 1.0, 0.0]])
    y, partner, lam = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1]), 0.3

    def ce_by_hand(target):  # -log softmax, averaged over the batch
        return sum(math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in
                   zip(logits.tolist(), target.tolist())) / len(target)

    batch = Batch(x=torch.zeros(3, 1, 2, 2), y=y, idx=torch.arange(3), y_partner=partner, lam=lam)
    mixed = run.method.loss(None, batch, {"logits": logits})
    assert list(mixed) == ["ce"]
    assert float(mixed["ce"]) == pytest.approx(lam * ce_by_hand(y) + (1 - lam) * ce_by_hand(partner), rel=1e-6)
    plain = run.method.loss(None, Batch(x=batch.x, y=y, idx=batch.idx), {"logits": logits})
    assert float(plain["ce"]) == pytest.approx(ce_by_hand(y), rel=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_lam_is_beta_alpha_alpha(alpha):
    """The Beta's mean 1/2 and variance 1 / (4 (2 alpha + 1)), and its CDF (scipy's), over 4000 draws."""
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    draws = np.array([beta_draw(alpha, g) for _ in range(4000)])
    assert draws.mean() == pytest.approx(0.5, abs=0.02)
    assert draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.08)
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_mix_inputs_mixes_with_the_configured_chance(tmp_path):
    cfg = tiny_config(tmp_path, "method=gdumb", "threads=1", "state0_cache=null", "gdumb.cutmix_prob=0.3")
    method = Run(cfg, tmp_path / "r", progress=False).method
    method.cutmix_state = torch.Generator().manual_seed(1).get_state()
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    batch = Batch(x=x, y=y, idx=torch.arange(4))
    outs = [method.mix_inputs(None, batch) for _ in range(2000)]
    mixed = [b for b in outs if b is not batch]
    assert len(mixed) / 2000 == pytest.approx(0.3, abs=0.04)
    assert all(b.y_partner is not None and sorted(b.y_partner.tolist()) == [0, 1, 2, 3] for b in mixed)
    assert all(b.x.shape == x.shape and torch.equal(b.y, y) for b in mixed)


# ----- runs on digits -----------------------------------------------------------------------------------
REGIME = ["train.schedule.type=sgdr", "train.schedule.warmup_epochs=1", "train.schedule.period=1",
          "train.schedule.period_mult=2", f"train.schedule.min_lr={MINLR}", f"train.lr={MAXLR}",
          "train.clip_grad_norm=10"]


def regime_run(tmp_path, name, *extra):
    cfg = tiny_config(tmp_path, "method=gdumb", "threads=1", "state0_cache=null", "train.epochs=6",
                      "train.batch_size=16", *REGIME, *extra)
    results = Run(cfg, tmp_path / name, progress=False).execute()
    lines = [json.loads(s) for s in (tmp_path / name / "history.jsonl").read_text().splitlines()]
    return strip_timings(results["states"]), [h for h in lines if h["kind"] == "epoch"]


def test_gdumb_runs_in_the_authors_regime_deterministically(tmp_path):
    before, _ = regime_run(tmp_path, "plain")
    off, _ = regime_run(tmp_path, "off", "gdumb.cutmix_prob=0")
    on, history = regime_run(tmp_path, "on", "gdumb.cutmix_prob=1")
    again, _ = regime_run(tmp_path, "again", "gdumb.cutmix_prob=1")
    assert off == before  # CutMix off: the run before the option existed
    assert on == again  # the same seed, the same CutMix draws
    assert [s["top1"] for s in on] != [s["top1"] for s in off]
    for state in (1, 2, 3):  # every state's fresh model follows the authors' schedule
        lrs = [h["lr"] for h in history if h["state"] == state and h["stage"] == "train"]
        assert lrs == pytest.approx(authors_lrs(6), rel=1e-9)


def test_cutmix_options_key_the_state0_cache(tmp_path):
    from cilkit.run import state0cache

    def signature(*extra):
        run = Run(tiny_config(tmp_path, "method=gdumb", "threads=1", *extra), tmp_path / "r", progress=False)
        return state0cache.method_signature(run.method)

    assert signature("gdumb.cutmix_prob=0.5")["options"] != signature()["options"]
    assert signature("gdumb.cutmix_alpha=0.4")["options"] != signature()["options"]
    assert "mix_inputs" in signature()["hooks"]


def test_a_cutmix_prob_out_of_range_is_one_line_naming_it(tmp_path, capsys):
    err = out_of_range_error(tmp_path, capsys, "method=gdumb", "gdumb.cutmix_prob=1.5")
    assert "gdumb.cutmix_prob" in err
