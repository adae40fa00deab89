"""BiC: the bias layer, stage 2 on synthetic logits, the corrected teacher, the validation split,
and an end-to-end run on digits."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, total

from cilkit.settings.config import ScenarioConfig, ScheduleConfig
from cilkit.common.errors import UserError
from cilkit.common.io import load_torch, write_torch
from cilkit.methods.base import Batch, FitSpec, distillation_kl
from cilkit.training.engine import Engine
from cilkit.methods.bic import BiC, fit_bias_layer, holdout_sizes, validation_sizes
from cilkit.models import BiasLayer
from cilkit.run.loop import Run
from cilkit.cil.scenario import Scenario


def test_bias_layer_changes_only_its_classes():
    layer = BiasLayer(2, 4)
    with torch.no_grad():
        layer.alpha.fill_(0.5)
        layer.beta.fill_(-1.0)
    z = torch.arange(12.0).reshape(2, 6)
    out = layer(z)
    assert torch.equal(out[:, [0, 1, 4, 5]], z[:, [0, 1, 4, 5]])
    assert torch.allclose(out[:, 2:4], 0.5 * z[:, 2:4] - 1.0)


def _biased_logits(n=4000, classes=6, new=(4, 6), scale=0.5, shift=-1.5, seed=0):
    """True logits, labels drawn from their softmax, and observed logits whose new-class columns
    are biased so that exactly ``scale * z_obs + shift`` recovers the truth."""
    g = torch.Generator().manual_seed(seed)
    z_true = 2.0 * torch.randn(n, classes, generator=g)
    labels = torch.multinomial(torch.softmax(z_true, 1), 1, generator=g).squeeze(1)
    z_obs = z_true.clone()
    z_obs[:, new[0] : new[1]] = (z_true[:, new[0] : new[1]] - shift) / scale
    return z_obs, labels


def _fit(z, y, beta_l2, epochs=60):
    """Stage 2 through the engine (a fit over the logits as rows), labels as class positions."""
    engine = Engine(dataset=None, eval_batch_size=256, device=torch.device("cpu"),  # type: ignore[arg-type]
                    mean=torch.zeros(1), std=torch.ones(1), progress=False)
    ctx = SimpleNamespace(engine=engine, state=SimpleNamespace(index=1), targets=lambda labels: labels,
                          generator=torch.Generator())
    spec = FitSpec(epochs=epochs, lr=0.1, momentum=0.9, weight_decay=0.0, batch_size=256,
                   schedule=ScheduleConfig(type="multistep", milestones=[40], gamma=0.1))
    return fit_bias_layer(ctx, z, y, BiasLayer(4, 6), spec, beta_l2, torch.Generator().manual_seed(1))


def test_stage2_through_the_engine_is_the_originals_sgd_loop():
    """The engine's fit over rows takes the steps of BiC's stage-2 loop as written by hand
    (shuffled mini-batches from the generator, SGD with momentum, MultiStepLR)."""
    z, y = _biased_logits(n=600)
    got = _fit(z, y, beta_l2=0.1, epochs=5)
    layer = BiasLayer(4, 6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[40], gamma=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        order = torch.randperm(600, generator=g)
        for start in range(0, 600, 256):
            idx = order[start:start + 256]
            loss = F.cross_entropy(layer(z[idx]), y[idx]) + 0.1 * layer.beta**2 / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    assert got.alpha.item() == pytest.approx(layer.alpha.item(), abs=1e-6)
    assert got.beta.item() == pytest.approx(layer.beta.item(), abs=1e-6)


def test_stage2_recovers_a_known_scale_and_shift():
    z, y = _biased_logits()
    layer = _fit(z, y, beta_l2=0.0)
    assert layer.alpha.item() == pytest.approx(0.5, abs=0.06)
    assert layer.beta.item() == pytest.approx(-1.5, abs=0.15)
    # the correction removes the bias toward the new classes: more test images right
    acc_before = (z.argmax(1) == y).float().mean()
    acc_after = (layer(z).argmax(1) == y).float().mean()
    assert acc_after > acc_before + 0.05
    # the original's L2 on beta (0.1 * beta^2 / 2) pulls beta toward 0
    assert abs(_fit(z, y, beta_l2=0.1).beta.item()) < abs(layer.beta.item())


def _state_ctx(scenario, state, teacher_logits):
    """The parts of a Context that BiC's stage-1 loss reads."""
    return SimpleNamespace(state=scenario.state(state), scenario=scenario)


def test_the_teacher_of_distillation_carries_the_previous_bias_correction(tmp_path):
    labels = torch.arange(6).repeat(5)
    scenario = Scenario(ScenarioConfig(order=list(range(6)), initial=2, increment=2), labels, labels, 6, 0)
    bic = BiC(tiny_config(tmp_path, "method=bic"))
    g = torch.Generator().manual_seed(0)
    teacher_z = torch.randn(5, 4, generator=g)  # state 2: the teacher knows classes 0..3
    student_z = torch.randn(5, 6, generator=g)
    y = torch.tensor([0, 3, 4, 5, 5])
    ctx = _state_ctx(scenario, 2, teacher_z)
    batch = Batch(x=torch.zeros(5, 1), y=y, idx=torch.arange(5), teacher={"logits": teacher_z})

    bic.bias = {1: (1.0, 0.0)}  # identity correction
    plain = total(bic.loss(ctx, batch, {"logits": student_z}))
    bic.bias = {1: (2.0, -1.0), 2: (7.0, 7.0)}
    target = bic.teacher_logits(ctx, batch)
    # the layer of state 1 acts on state 1's classes (2, 3) only; state 2's layer not at all
    assert torch.equal(target[:, :2], teacher_z[:, :2])
    assert torch.allclose(target[:, 2:], 2.0 * teacher_z[:, 2:] - 1.0)
    corrected = total(bic.loss(ctx, batch, {"logits": student_z}))
    assert corrected.item() != pytest.approx(plain.item())
    lam = 4 / 6  # n_old / n_seen
    expected = lam * distillation_kl(student_z[:, :4], target, 2.0) + (1 - lam) * F.cross_entropy(student_z, y)
    assert corrected.item() == pytest.approx(expected.item(), rel=1e-6)


def test_validation_split_is_balanced_and_held_out_of_stage1(tmp_path):
    cfg = tiny_config(tmp_path, "method=bic", "memory.total=200", "memory.selection=random")
    run = Run(cfg, tmp_path / "r", progress=False)
    run.execute(until_state=0)
    bic = run.method
    ctx = run.context(1)  # the memory is as state 1 trains on it (not yet updated)
    bic.begin_round(ctx)
    train = bic.train_set(ctx)
    val = bic.val[1]
    pos = run.scenario.train_pos
    counts = torch.bincount(pos[val], minlength=ctx.state.n_seen)
    v = bic.val_per_class[1]
    assert v == 5  # floor(0.1 * 200 / 4 old classes)
    assert counts.tolist() == [v] * ctx.state.n_seen  # the same count for old and new classes
    assert not torch.isin(val, train).any()  # not trained on in stage 1
    old_val = val[pos[val] < ctx.state.n_old]
    assert not torch.isin(old_val, run.memory.indices(ctx.state.old)).any()  # not a training exemplar
    # inside the budget: each old class trains on its share minus v and keeps v validation images
    old_train = train[pos[train] < ctx.state.n_old]
    assert old_train.numel() + old_val.numel() == len(run.memory) == 200
    assert torch.isin(old_train, run.memory.indices(ctx.state.old)).all()
    new_train = train[pos[train] >= ctx.state.n_old]
    assert sorted(torch.cat([new_train, val[pos[val] >= ctx.state.n_old]]).tolist()) == sorted(ctx.state.train.tolist())
    assert torch.equal(bic.train_set(ctx), train)  # asked again (statistics): the same split
    # the split, the hold-outs and the bias layers survive a checkpoint (loaded with weights_only)
    bic.bias[1] = (0.8, -0.3)
    write_torch(tmp_path / "m.pt", {"method": bic.state_dict()})
    other = BiC(cfg)
    other.load_state_dict(load_torch(tmp_path / "m.pt")["method"])
    assert torch.equal(other.val[1], val) and other.bias == {1: (0.8, -0.3)} and other.val_per_class == {1: v}
    assert all(torch.equal(other.holdout[c], bic.holdout[c]) for c in range(ctx.state.n_seen))


def test_validation_sizes_follow_the_original_for_2000_exemplars_and_10_classes_per_state():
    ends = [10 * (b + 1) for b in range(10)]
    assert validation_sizes(ends, 2000, None, 0.1) == [0, 20, 10, 6, 5, 4, 3, 2, 2, 2]
    # a class holds out what its first bias stage uses; later stages take a prefix of it
    assert holdout_sizes(ends, 2000, None, 0.1) == [20, 20, 10, 6, 5, 4, 3, 2, 2, 2]
    assert validation_sizes([50, 60, 70], None, 20, 0.1) == [0, 2, 2]  # per-class memory: constant


def test_no_validation_image_is_ever_trained_on_or_stored_as_an_exemplar(tmp_path, monkeypatch):
    trained = {}
    fit = Engine.fit

    def recording_fit(self, ctx, method, indices, *args, **kwargs):
        if kwargs.get("data") is None:  # a fit over training images (not stage 2's over logits)
            trained[ctx.state.index] = indices.clone()
        return fit(self, ctx, method, indices, *args, **kwargs)

    monkeypatch.setattr(Engine, "fit", recording_fit)
    cfg = tiny_config(tmp_path, "method=bic", "scenario.increment=2", "scenario.states=4", "memory.total=200",
                      "train.epochs=1", "state0_cache=null", "threads=1")
    run = Run(cfg, tmp_path / "r", progress=False)
    memory_after = {}
    after_state = run.method.after_state  # the hook called right after the memory update

    def recording_after_state(ctx):
        memory_after[ctx.state.index] = run.memory.indices()
        after_state(ctx)

    monkeypatch.setattr(run.method, "after_state", recording_after_state)
    res = run.execute()
    bic, pos = run.method, run.scenario.train_pos
    assert sorted(trained) == [0, 1, 2, 3]
    validation = torch.cat([bic.val[b] for b in (1, 2, 3)])
    every_train = torch.cat(list(trained.values()))
    assert not torch.isin(validation, every_train).any()  # never trained on, in any state
    assert not torch.isin(validation, torch.cat(list(memory_after.values()))).any()  # never a training exemplar
    assert [bic.val_per_class[b] for b in (1, 2, 3)] == [5, 3, 2]  # floor(0.1 * 200 / n_old)
    for b in (2, 3):  # an old class keeps a prefix of the images it held out when it was new
        for c in range(run.scenario.ends[b - 1]):
            now, before = bic.val[b][pos[bic.val[b]] == c], bic.val[b - 1][pos[bic.val[b - 1]] == c]
            assert torch.equal(now, before[: now.numel()])
    for b in (1, 2, 3):
        info = res["states"][b]["bic"]
        old = trained[b][pos[trained[b]] < run.scenario.ends[b - 1]]
        assert info["train_exemplars"] == old.numel()
        assert info["memory_used"] == 200 and info["memory_used"] == info["train_exemplars"] + info["val_per_class"] * run.scenario.ends[b - 1]
        record = json.loads((tmp_path / "r" / "bic" / f"state_{b:02d}.json").read_text())
        assert sorted(sum(record["validation"].values(), [])) == sorted(bic.val[b].tolist())


def test_bic_errors_name_the_class_and_the_fix(tmp_path):
    # digits has about 144 training images per class: 2000 exemplars per class at a ratio of
    # 0.5 would hold out 1000 of them
    with pytest.raises(UserError, match="too few to hold out 1000"):
        Run(tiny_config(tmp_path, "method=bic", "memory.total=null", "memory.per_class=2000", "bic.val_ratio=0.5", "threads=1"),
            tmp_path / "few", progress=False).execute(until_state=0)
    # 5 exemplars for 7 old classes: some old class has none, so no room for its validation images
    with pytest.raises(UserError, match="has no exemplar in state 3"):
        Run(tiny_config(tmp_path, "method=bic", "memory.total=5", "train.epochs=1", "threads=1"),
            tmp_path / "none", progress=False).execute()


def test_state_weight_decay_follows_the_original_schedule(tmp_path):
    cfg = tiny_config(tmp_path, "method=bic", "bic.state_weight_decay=true", "train.weight_decay=0.001")
    bic = BiC(cfg)
    labels = torch.arange(10).repeat(3)
    scenario = Scenario(ScenarioConfig(order=list(range(10)), initial=4, increment=3), labels, labels, 10, 0)
    model = torch.nn.Linear(2, 2)
    for b in range(3):  # 1e-3 * 3 states / (b + 1)
        ctx = SimpleNamespace(config=cfg, scenario=scenario, state=scenario.state(b), model=model)
        assert bic.fit_spec(ctx, FitSpec.of_state(cfg.train, b)).weight_decay == pytest.approx(0.003 / (b + 1))
    # a different state-0 model: not the cached fine-tuning one
    assert bic.state0_signature() != BiC(tiny_config(tmp_path, "method=bic")).state0_signature()


def test_bic_needs_a_memory(tmp_path):
    with pytest.raises(UserError, match="memory"):
        BiC(tiny_config(tmp_path, "method=bic", "memory.total=0"))


def test_bic_end_to_end_on_digits(tmp_path):
    res = Run(tiny_config(tmp_path, "method=bic"), tmp_path / "r", progress=False).execute()
    assert res["complete"] and res["primary_scores"] == "bic"
    ends = res["state_ends"]
    for b, s in enumerate(res["states"]):
        assert set(s["variants"]) == {"uncorrected"}
        info = s["bic"]
        npz = np.load(tmp_path / "r" / "scores" / f"state_{b:02d}.npz")
        z, scores = npz["logits"], npz["scores"]
        assert np.array_equal(npz["scores_uncorrected"], z)
        if b == 0:
            assert (info["alpha"], info["beta"]) == (1.0, 0.0) and np.array_equal(scores, z)
            continue
        assert info["val_images"] == info["val_per_class"] * s["classes_seen"] > 0
        # test scores: only this state's layer, only on this state's new classes
        new = slice(ends[b - 1], ends[b])
        assert np.array_equal(scores[:, : ends[b - 1]], z[:, : ends[b - 1]])
        assert np.allclose(scores[:, new], info["alpha"] * z[:, new] + info["beta"], atol=1e-5)
        assert abs(100 * (z.argmax(1) == npz["labels"]).mean() - s["variants"]["uncorrected"]["top1"]) < 1e-6
