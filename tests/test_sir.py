"""SIR (reconstruction): each component on hand-made inputs, the switches, and an end-to-end run."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, total

from cilkit.cil.classwise import normalised_class_means as class_prototypes
from cilkit.settings.config import ScenarioConfig
from cilkit.common.errors import UserError
from cilkit.methods.sir import (
    class_ages,
    compensation_strengths,
    frequency_offsets,
    inheritance_targets,
    sir_loss,
    transfer_distribution,
)
from cilkit.models import SplitCosineLinear
from cilkit.models.lsc import LocalSimilarityClassifier
from cilkit.run.loop import Run
from cilkit.cil.scenario import Scenario


def _scenario():
    labels = torch.arange(10).repeat(3)
    return Scenario(ScenarioConfig(order=list(range(10)), initial=4, increment=3), labels, labels, 10, 0)


# ----- 1. frequency compensation ----------------------------------------------------------------
def test_frequency_offsets_are_tau_log_count_over_the_largest_count():
    off = frequency_offsets(torch.tensor([10, 90, 30]), torch.tensor([1.0, 0.5, 2.0]))
    assert off.tolist() == pytest.approx([math.log(10 / 90), 0.0, 2.0 * math.log(30 / 90)])
    # with one tau for every class it is the prior log(n_j / N) up to a constant: the same loss
    counts = torch.tensor([20, 20, 500])
    z, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    prior = torch.log(counts.double() / counts.sum()).float()
    assert sir_loss(z, y, frequency_offsets(counts, torch.ones(3)), None).item() == pytest.approx(
        F.cross_entropy(z + prior, y).item(), rel=1e-5)
    # a class without images keeps a finite offset (count clamped to 1)
    assert torch.isfinite(frequency_offsets(torch.tensor([0, 50]), torch.ones(2))).all()


def _fit_class_biases(labels, offsets, steps=300):
    """A model with nothing but one bias per class, trained with ``sir_loss``."""
    bias = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([bias], lr=1.0)
    for _ in range(steps):
        loss = sir_loss(bias.expand(labels.numel(), 2), labels, offsets, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return bias.detach()


def test_frequency_compensation_removes_the_prior_of_the_frequent_class():
    # 1 exemplar of an old class for 9 new images: plain cross-entropy learns the prior
    # (the new class wins by log 9); the compensated loss learns balanced scores.
    labels = torch.tensor([0] + [1] * 9)
    counts = torch.bincount(labels)
    plain = _fit_class_biases(labels, None)
    compensated = _fit_class_biases(labels, frequency_offsets(counts, torch.ones(2)))
    assert (plain[1] - plain[0]).item() == pytest.approx(math.log(9), abs=0.02)
    assert (compensated[1] - compensated[0]).item() == pytest.approx(0.0, abs=0.02)


# ----- 3. chronological attenuation -------------------------------------------------------------
def test_class_ages_and_attenuated_strengths():
    ages = class_ages(_scenario(), 2)  # classes 0-3 from state 0, 4-6 from state 1, 7-9 new
    assert ages.tolist() == [2, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert compensation_strengths(2.0, ages, 0.5).tolist() == [0.5] * 4 + [1.0] * 3 + [2.0] * 3
    assert compensation_strengths(2.0, ages, None).tolist() == [2.0] * 10
    # attenuated: the oldest classes get the smallest compensation
    off = frequency_offsets(torch.tensor([10] * 7 + [100] * 3), compensation_strengths(1.0, ages, 0.5))
    assert off[0] > off[4] > off[7] - 10  # less negative = less boost for the older classes


def test_attenuated_old_classes_stay_compensated_against_the_new_ones_on_a_long_protocol():
    # 10 states of 10 classes: at the last state, 90 old classes with 20 exemplars each, aged 1..9
    # (10 classes per age), and 10 new classes of 500 images; plus an extreme age of 10
    ages = torch.cat([torch.arange(9, 0, -1).repeat_interleave(10), torch.tensor([10]), torch.zeros(10, dtype=torch.int64)])
    counts = torch.cat([torch.full((91,), 20), torch.full((10,), 500)])
    off = frequency_offsets(counts, compensation_strengths(1.0, ages, 0.9))
    old, new = off[:91], off[91:]
    assert (old < new.min()).all()  # every old class, the oldest included, keeps a negative margin
    assert off[90] > off[0] > off[80]  # older = less compensation (age 10 > 9 > 1), never reversed
    assert new.tolist() == pytest.approx([0.0] * 10)


# ----- 2. inheritance transfer ------------------------------------------------------------------
def test_transfer_follows_the_similarity_in_the_old_feature_space():
    # old classes 0, 1, 2 along the axes; old class 3 has no exemplar; new class 4 lies near class 1
    feats = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0.1], [0, 0, 1.0], [0.1, 1.0, 0.2]])
    pos = torch.tensor([0, 0, 1, 1, 2, 4])
    protos = class_prototypes(feats, pos, 5)
    assert torch.isnan(protos[3]).all()
    assert protos[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    q = transfer_distribution(protos[4:5], protos[:4], temperature=0.1)
    assert q.sum().item() == pytest.approx(1.0)
    assert q[0].argmax().item() == 1 and q[0, 3].item() == 0.0
    # a lower temperature concentrates the weight on the nearest old class
    assert transfer_distribution(protos[4:5], protos[:4], 0.05)[0, 1] > q[0, 1]


def test_inheritance_targets_mix_the_transfer_into_new_samples_only():
    transfer = torch.tensor([[0.25, 0.75], [1.0, 0.0]])  # new classes 2, 3 over old classes 0, 1
    t = inheritance_targets(torch.tensor([0, 2, 3]), n_seen=4, n_old=2, transfer=transfer, weight=0.2)
    assert t[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert t[1].tolist() == pytest.approx([0.05, 0.15, 0.8, 0.0])
    assert t[2].tolist() == pytest.approx([0.2, 0.0, 0.0, 0.8])
    # no old prototype at all (no memory): the targets stay one-hot
    none = inheritance_targets(torch.tensor([2]), 4, 2, torch.zeros(2, 2), weight=0.2)
    assert none[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert transfer_distribution(torch.ones(1, 3) / 3**0.5, torch.full((2, 3), float("nan")), 0.1).sum() == 0
    z = torch.randn(3, 4)
    y = torch.tensor([0, 2, 3])
    one_hot = inheritance_targets(y, 4, 2, transfer, weight=0.0)
    assert sir_loss(z, y, None, one_hot).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    assert sir_loss(z, y, None, t).item() != pytest.approx(F.cross_entropy(z, y).item())


# ----- switches, end to end ---------------------------------------------------------------------
def test_attenuation_without_compensation_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match="sir.chronological_attenuation"):
        tiny_config(tmp_path, "method=sir", "sir.frequency_compensation=false")


@pytest.mark.slow
def test_sir_end_to_end_and_with_every_component_off_it_is_finetuning(tmp_path):
    sir = Run(tiny_config(tmp_path, "method=sir"), tmp_path / "sir", progress=False).execute()
    assert sir["complete"]
    last = sir["states"][-1]["sir"]
    assert last["tau"][:4] == pytest.approx([0.81] * 4) and last["tau"][-1] == 1.0  # attenuated by age
    assert sum(last["train_counts"][7:]) > sum(last["train_counts"][:7])  # new data outnumber exemplars
    assert set(last["nearest_old_class"]) == {"7", "8", "9"}
    off = tiny_config(tmp_path, "method=sir", "sir.frequency_compensation=false",
                      "sir.inheritance_transfer=false", "sir.chronological_attenuation=false")
    plain = Run(off, tmp_path / "off", progress=False).execute(until_state=1)
    ft = Run(tiny_config(tmp_path), tmp_path / "ft", progress=False).execute(until_state=1)
    assert plain["accuracy_matrix"] == ft["accuracy_matrix"]
    assert sir["accuracy_matrix"][:2] != ft["accuracy_matrix"]


def test_inherited_mass_is_scored_against_the_raw_logits_and_the_own_class_against_the_compensated():
    z = torch.tensor([[0.3, -0.2, 1.0, 0.1]])
    y = torch.tensor([2])
    offsets = torch.tensor([-2.0, -2.0, 0.0, 0.0])
    t = torch.tensor([[0.06, 0.04, 0.9, 0.0]])
    expected = -(0.9 * F.log_softmax(z + offsets, dim=1)[0, 2]
                 + 0.06 * F.log_softmax(z, dim=1)[0, 0] + 0.04 * F.log_softmax(z, dim=1)[0, 1])
    assert sir_loss(z, y, offsets, t).item() == pytest.approx(expected.item(), rel=1e-6)
    # without compensation it is the plain soft cross-entropy
    assert sir_loss(z, y, None, t).item() == pytest.approx(-(t * F.log_softmax(z, dim=1)).sum().item(), rel=1e-6)


def _ablation_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sir_ablation.py"
    spec = importlib.util.spec_from_file_location("bench_sir_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ablation_config_switches_each_component_on_and_off():
    from cilkit.settings.config import load_config, validate

    bench = _ablation_module()
    protocol, variants, memories = bench.load_ablation(bench.DEFAULT_ABLATION)
    base = load_config(protocol).to_dict()
    configs = {name: validate(bench.variant_config(base, sw)) for name, sw in variants.items()}
    assert configs["finetune"].method == "finetune"
    switches = {name: tuple(c.to_dict()["sir"][k] for k in ("frequency_compensation", "inheritance_transfer",
                                                             "chronological_attenuation"))
                for name, c in configs.items() if c.method == "sir"}
    for i in range(3):  # every component is on in some variant and off in another
        assert {s[i] for s in switches.values()} == {True, False}
    assert switches["all"] == (True, True, True) and switches["none"] == (False, False, False)
    assert all(c.train == configs["all"].train and c.memory == configs["all"].memory for c in configs.values())
    # the memory sweep replaces the protocol's memory (SIR's protocol: memory per class)
    assert memories == [200, 50, 20, 5]
    swept = validate(bench.variant_config(base, variants["all"], memory=5, seed=7))
    assert (swept.memory.per_class, swept.memory.total, swept.seed) == (5, None, 7)
    assert swept.memory.selection == configs["all"].memory.selection


# ----- SIR on a base method --------------------------------------------------------------------------
def _state1(tmp_path, *sets):
    from cilkit.methods.base import Batch

    cfg = tiny_config(tmp_path, "threads=1", "state0_cache=null", "train.epochs=1", "scenario.states=2", *sets)
    run = Run(cfg, tmp_path / "r", progress=False)
    run.execute(until_state=0)
    ctx = run.context(1)
    run.method.before_state(ctx)
    run.method.begin_round(ctx)
    idx = ctx.state.train[:16]
    x, labels, _ = next(run.dataset.train.batches(idx, 16, mean=run.mean, std=run.std))
    teacher = None
    if ctx.teacher is not None:  # what the engine hands the loss: the teacher's outputs, no gradient
        with torch.no_grad():
            teacher = ctx.teacher(x, stages=run.method.needs_stages)
    batch = Batch(x=x, y=ctx.targets(labels), idx=idx, teacher=teacher)
    return run, ctx, batch


def test_sir_on_lucir_with_every_component_off_is_lucirs_loss(tmp_path):
    off = ["sir.frequency_compensation=false", "sir.inheritance_transfer=false", "sir.chronological_attenuation=false"]
    sir_run, ctx, batch = _state1(tmp_path / "s", "method=sir", "sir.base=lucir", *off)
    lucir = sir_run.method.base  # the same model and teacher, LUCIR's own loss
    out = ctx.model(batch.x)
    assert isinstance(ctx.model.head, SplitCosineLinear) and ctx.teacher is not None
    expected = total(lucir.loss(ctx, batch, out))  # CE(sigma cos) + lambda L_lf + L_mr
    got = sir_run.method.loss(ctx, batch, out)
    assert list(got) == ["sir", "less_forget", "margin_ranking"]  # SIR's term in place of LUCIR's CE
    assert total(got).item() == pytest.approx(expected.item(), rel=1e-6)


def _sir_on_podnet_by_hand(ctx, images, teacher, batch_y, out, old, tau, gamma, w, temperature, lam_f, lam_c):
    """SIR's state-1 loss on PODNet written out from docs/sir.md and the PODNet paper (Eq. 2-5),
    in float64, sharing no code with the method: SIR's cross-entropy over the class logits in
    place of NCA, plus ``r (lambda_f L_flat + lambda_c L_spatial)``."""
    st = ctx.state
    # 1. frequency compensation: n_j over the round's training set (the new images and the old
    #    classes' exemplars), tau_j = tau * gamma ** age_j (the old classes were learned one state ago)
    trained = torch.cat([st.train, ctx.memory.indices(st.old)])
    n = torch.bincount(ctx.scenario.train_pos[trained], minlength=st.n_seen).double()
    age = torch.tensor([1.0 if c < st.n_old else 0.0 for c in range(st.n_seen)], dtype=torch.float64)
    offsets = tau * gamma**age * torch.log(n / n.max())
    # 2. inheritance transfer: class prototypes under the previous model (mean of the unit
    #    features, made unit), q_n = softmax over the old classes of cos(mu_n, mu_o) / T
    protos = []
    for c in range(st.n_seen):
        idx = trained[ctx.scenario.train_pos[trained] == c]
        with torch.no_grad():
            f = torch.cat([teacher(x)["features"] for x, _, _ in images(idx)]).double()
        m = (f / f.norm(dim=1, keepdim=True)).mean(dim=0)
        protos.append(m / m.norm())
    mu = torch.stack(protos)
    cos = mu[st.n_old:] @ mu[: st.n_old].T
    q = torch.exp(cos / temperature) / torch.exp(cos / temperature).sum(dim=1, keepdim=True)
    z = out["logits"].detach().double()
    z_comp = z + offsets
    total = 0.0
    for i, y in enumerate(batch_y.tolist()):
        t = torch.zeros(st.n_seen, dtype=torch.float64)
        t[y] = 1.0
        if y >= st.n_old:  # a new class: (1 - w) onehot + w q_y over the old classes
            t = (1 - w) * t
            t[: st.n_old] = w * q[y - st.n_old]
        log_p_comp = z_comp[i] - torch.logsumexp(z_comp[i], dim=0)
        log_p = z[i] - torch.logsumexp(z[i], dim=0)
        total += -t[y] * log_p_comp[y] - sum(t[o] * log_p[o] for o in range(st.n_seen) if o != y)
    classification = total / len(batch_y)
    # PODNet's distillation: POD-flat, 1 - cos of the final embeddings; POD-spatial, per stage the
    # squared map summed over the width and over the height, unit, Euclidean distance
    h_old, h_new = old["features"].double(), out["features"].detach().double()
    flat = (1 - (h_old * h_new).sum(dim=1) / (h_old.norm(dim=1) * h_new.norm(dim=1))).mean()
    spatial = 0.0
    for a_old, a_new in zip(old["stages"], out["stages"], strict=True):
        def pooled(a):
            a = a.detach().double() ** 2
            v = torch.cat([a.sum(dim=3).flatten(1), a.sum(dim=2).flatten(1)], dim=1)
            return v / v.norm(dim=1, keepdim=True)
        spatial += (pooled(a_old) - pooled(a_new)).norm(dim=1).mean() / len(out["stages"])
    r = math.sqrt(st.n_seen / st.n_new)
    return float(classification + r * (lam_f * flat + lam_c * spatial)), offsets


def test_sir_on_podnet_replaces_nca_and_keeps_the_pod_terms(tmp_path):
    tau, gamma, w, temperature, lam_f, lam_c = 0.8, 0.5, 0.3, 0.5, 2.0, 0.5  # all off their defaults
    run, ctx, _ = _state1(tmp_path, "method=sir", "sir.base=podnet", "podnet.proxies_per_class=2",
                          f"sir.tau={tau}", f"sir.attenuation={gamma}", f"sir.transfer_weight={w}",
                          f"sir.transfer_temperature={temperature}", f"podnet.lambda_flat={lam_f}",
                          f"podnet.lambda_spatial={lam_c}")
    from cilkit.methods.base import Batch

    sir, st = run.method, ctx.state
    assert sir.needs_stages and isinstance(ctx.model.head, LocalSimilarityClassifier)
    idx = torch.cat([ctx.memory.indices(st.old)[::8], st.train[:12]])  # old exemplars and new images

    def images(indices):
        return run.dataset.train.batches(indices, 512, mean=run.mean, std=run.std)

    x, labels, _ = next(images(idx))
    batch = Batch(x=x, y=ctx.targets(labels), idx=idx)
    assert (batch.y < st.n_old).any() and (batch.y >= st.n_old).any()
    teacher = ctx.teacher  # the model before this state, frozen
    with torch.no_grad():  # a student that has moved away from its teacher, as in training: POD terms > 0
        g = torch.Generator().manual_seed(0)
        for p in ctx.model.backbone.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))
    out = ctx.model(batch.x, stages=True)
    with torch.no_grad():
        old = teacher(batch.x, stages=True)
    if any(f.name == "teacher" for f in dataclasses.fields(batch)):  # the engine hands the teacher's outputs over
        batch = dataclasses.replace(batch, teacher=old)
    got = sir.loss(ctx, batch, out)
    got = sum(got.values()) if isinstance(got, dict) else got  # named terms: the engine sums them
    expected, offsets = _sir_on_podnet_by_hand(ctx, images, teacher, batch.y, out, old, tau, gamma, w,
                                               temperature, lam_f, lam_c)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert (offsets[: st.n_old] < 0).all()  # the old classes are the rare ones: compensated
    no_pod, _ = _sir_on_podnet_by_hand(ctx, images, teacher, batch.y, out, old, tau, gamma, w, temperature, 0.0, 0.0)
    assert expected - no_pod > 1e-3  # the distillation terms weigh in the comparison
    results = Run(run.config, tmp_path / "full", progress=False).execute()
    own = results["states"][1]["sir"]
    assert {"train_counts", "tau", "factor", "scale"} <= set(own)  # SIR's and PODNet's records
    history = [json.loads(line) for line in (tmp_path / "full" / "history.jsonl").read_text().splitlines()]
    assert {tuple(h["terms"]) for h in history if h["kind"] == "epoch" and h["state"] == 2
            and h["stage"] == "train"} == {("sir", "pod")}  # SIR's term in place of NCA, PODNet's kept
