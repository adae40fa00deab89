"""Active class-incremental learning: acquisition functions on hand-made pools, the oracle,
the budget split, imbalance profiles, repeated runs, and an end-to-end active run on digits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import strip_timings, tiny_config

from cilkit.methods.active import acquisition as af
from cilkit.methods.active.oracle import Oracle
from cilkit.settings.config import ImbalanceConfig, ScenarioConfig, load_config
from cilkit.training.engine import Engine
from cilkit.common.errors import UserError
from cilkit.cil.budgets import annotation_budget, cycle_budgets
from cilkit.run.loop import Run
from cilkit.runs.multirun import run_methods
from cilkit.cil.scenario import Scenario, imbalance_counts


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- classical functions ---------------------------------------------------------------------
PROBS = torch.tensor([
    [0.90, 0.05, 0.05],  # confident
    [0.34, 0.33, 0.33],  # flattest
    [0.50, 0.50, 0.00],  # smallest gap (0)
    [0.60, 0.30, 0.10],
])


def test_entropy_picks_the_flattest_distributions_first():
    assert af.entropy_pick(PROBS, 4).tolist() == [1, 3, 2, 0]  # entropies 1.10, 0.90, 0.69, 0.39


def test_margin_picks_the_smallest_gaps_first_and_original_reverses():
    # gaps: 0.85, 0.01, 0.0, 0.3
    assert af.margin_pick(PROBS, 4).tolist() == [2, 1, 3, 0]
    assert af.margin_pick(PROBS, 2, order="original").tolist() == [0, 3]


def test_least_confidence_picks_the_lowest_top_probability():
    assert af.least_confidence_pick(PROBS, 2).tolist() == [1, 2]


def test_random_pick_is_seeded_and_without_repeats():
    a, b = af.random_pick(50, 10, gen(1)), af.random_pick(50, 10, gen(1))
    assert a.tolist() == b.tolist() and a.unique().numel() == 10
    assert af.random_pick(3, 10, gen(1)).numel() == 3


def test_kcenter_picks_the_farthest_point_from_the_centres():
    x = torch.tensor([[1.0], [2.0], [10.0], [4.0]])
    picks = af.kcenter_pick(x, 2, gen(), centres=torch.tensor([[0.0]]))
    assert picks.tolist() == [2, 3]  # 10 (farthest from 0), then 4 (4 from its nearest centre)


def test_kcenter_without_centres_starts_at_random_then_goes_far():
    x = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
    picks = af.kcenter_pick(x, 2, gen(5))
    assert picks.unique().numel() == 2
    if picks[0] != 3:
        assert picks[1] == 3


def test_scaling_changes_the_acquisition_probabilities():
    logits = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    plain = af.acquisition_probabilities(logits)
    scaled = af.acquisition_probabilities(logits, torch.tensor([90, 10]))
    assert torch.allclose(scaled.sum(1), torch.ones(2, dtype=torch.float64))
    # the rare class is boosted by N / n_j: 100/10 against 100/90
    assert scaled[1, 1] > 0.85 and plain[1, 1] == pytest.approx(0.5)


def test_renormalising_the_scaled_probabilities_changes_the_picks_of_every_function():
    # counts 90 / 10 scale the two classes by 100/90 and 10; rows (before scaling):
    # A = [0.95, 0.05], B = [0.99, 0.01], C = [0.5, 0.5]
    logits = torch.tensor([[0.95, 0.05], [0.99, 0.01], [0.5, 0.5]]).log()
    counts = torch.tensor([90, 10])
    raw = af.acquisition_probabilities(logits, counts, renormalise=False)  # the original's form
    norm = af.acquisition_probabilities(logits, counts)  # cilkit's default
    assert raw[2].tolist() == pytest.approx([0.5 * 100 / 90, 5.0])  # scaled, not summing to 1
    assert torch.allclose(norm.sum(1), torch.ones(3, dtype=torch.float64))
    # raw:  top score 1.056, 1.1, 5.0; gap 0.56, 1.0, 4.44; entropy 0.29, 0.13, -7.7
    # norm: top score 0.68, 0.92, 0.90; gap 0.36, 0.83, 0.80; entropy 0.63, 0.29, 0.33
    assert af.least_confidence_pick(raw, 2).tolist() == [0, 1]
    assert af.least_confidence_pick(norm, 2).tolist() == [0, 2]
    assert af.margin_pick(raw, 2).tolist() == [0, 1]
    assert af.margin_pick(norm, 2).tolist() == [0, 2]
    assert af.entropy_pick(raw, 2).tolist() == [0, 1]
    assert af.entropy_pick(norm, 2).tolist() == [0, 2]
    # without scaling there is nothing to renormalise
    assert torch.equal(af.acquisition_probabilities(logits, None, renormalise=False), af.acquisition_probabilities(logits))


def test_minmax_normalises_each_dimension_over_the_pool():
    f = af.minmax_normalise(torch.tensor([[0.0, 5.0, 3.0], [10.0, 5.0, 1.0], [5.0, 5.0, 2.0]]))
    assert f.min(0).values.tolist() == [0, 0, 0]
    assert f[:, 0].tolist() == [0.0, 1.0, 0.5] and f[:, 1].tolist() == [0, 0, 0]


# ----- balancing functions ---------------------------------------------------------------------
def annotated_stats() -> af.ClassStats:
    """Class 0: 3 annotations at (0, 0) (majority); class 1: 1 at (10, 0) (minority)."""
    feats = torch.tensor([[0.0, 0.0]] * 3 + [[10.0, 0.0]])
    return af.ClassStats.of(feats, torch.tensor([0, 0, 0, 1]), 3)


def test_poor_serves_the_class_with_fewest_annotations_first():
    cand = torch.tensor([[1.0, 0.0], [9.0, 0.0], [5.0, 5.0], [0.5, 0.5]])
    truth = [0, 1, 2, 0]
    asked = []

    def annotate(row):
        asked.append(row)
        return truth[row]

    stats = annotated_stats()
    picks = af.poor_pick(cand, 1, stats, annotate, gen())
    assert picks.tolist() == [1] == asked  # the candidate nearest the poorest class (1)
    assert stats.counts.tolist() == [3, 2, 0]  # updated with the revealed label


def test_poor_follows_the_revealed_labels():
    # the candidate nearest class 1 turns out to be of class 2: class 1 stays the poorest (tied
    # with 2, and first in position order), all classes are now majority, and poor serves it
    # again with the candidate whose distance to mu_1 exceeds its nearest mean the least
    cand = torch.tensor([[9.0, 0.0], [0.0, 20.0], [0.0, 21.0], [1.0, 0.0]])
    truth = [2, 2, 0, 0]
    stats = annotated_stats()
    picks = af.poor_pick(cand, 2, stats, lambda r: truth[r], gen())
    assert picks.tolist() == [0, 2]
    assert stats.counts.tolist() == [4, 1, 1]


def test_bcore_restricts_to_the_candidates_of_its_rule():
    # (-20, 0) is the farthest from every centre but nearer the majority mean: excluded by
    # bcore's rule, picked first by plain k-center. (6, 0) and (7, 0) satisfy the rule; (6, 0)
    # is farther from its nearest centre (10, 0).
    cand = torch.tensor([[-20.0, 0.0], [7.0, 0.0], [6.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0]] * 3 + [[10.0, 0.0]])
    picks = af.bcore_pick(cand, 1, annotated_stats(), lambda r: 1, gen(), centres)
    assert picks.tolist() == [2]
    assert af.kcenter_pick(cand, 1, gen(), centres).tolist() == [0]


def test_bcore_without_minority_falls_back_to_plain_kcenter():
    stats = af.ClassStats.of(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([0, 1]), 2)
    cand = torch.tensor([[-20.0, 0.0], [7.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    assert af.bcore_pick(cand, 1, stats, lambda r: 0, gen(), centres).tolist() == [0]


# ----- oracle and budget -----------------------------------------------------------------------
def test_oracle_reveals_only_annotated_labels_once():
    positions = torch.tensor([5, 6, 5, 7, 6, 5])
    oracle = Oracle(torch.tensor([1, 2, 4, 5]), positions)
    assert oracle.annotate(torch.tensor([2, 5])).tolist() == [5, 5]
    assert oracle.revealed == 2 and oracle.unlabelled.tolist() == [1, 4]
    assert oracle.counts(8).tolist()[5] == 2
    with pytest.raises(ValueError, match="twice"):
        oracle.annotate(2)
    with pytest.raises(ValueError, match="outside the pool"):
        oracle.annotate(0)
    assert oracle.revealed == 2


@pytest.mark.parametrize("total,expected", [(100, [40, 20, 20, 20]), (22, [9, 4, 5, 4]), (3, [1, 1, 0, 1]), (0, [0] * 4)])
def test_cycle_budgets_split_40_20_20_20(total, expected):
    assert cycle_budgets(total, 4, 0.4) == expected


def test_the_budget_is_spent_exactly():
    for pool in range(0, 3000, 37):
        total = annotation_budget(0.05, pool)
        assert total == int(np.floor(0.05 * pool + 0.5))
        for cycles in (1, 2, 4, 7):
            parts = cycle_budgets(total, cycles, 0.4)
            assert sum(parts) == total and min(parts) >= 0 and len(parts) == cycles


# ----- imbalance profiles ----------------------------------------------------------------------
def test_longtail_step_and_counts_profiles():
    avail = torch.full((5,), 100)
    lt = ImbalanceConfig(profile="longtail", ratio=10, ordering="position")
    assert imbalance_counts(lt, avail, 0).tolist() == [100, 56, 31, 17, 10]
    step = ImbalanceConfig(profile="step", ratio=10, minority_fraction=0.4, ordering="position")
    assert imbalance_counts(step, avail, 0).tolist() == [100, 100, 100, 10, 10]
    shuffled = imbalance_counts(ImbalanceConfig(profile="longtail", ratio=10), avail, 3)
    assert sorted(shuffled.tolist()) == [10, 17, 31, 56, 100]
    assert shuffled.tolist() == imbalance_counts(ImbalanceConfig(profile="longtail", ratio=10), avail, 3).tolist()
    counts = ImbalanceConfig(profile="counts", counts=[5, 4, 3, 2, 1, 9])
    assert imbalance_counts(counts, avail, 0).tolist() == [5, 4, 3, 2, 1]
    with pytest.raises(UserError, match="scenario.imbalance.counts"):
        imbalance_counts(ImbalanceConfig(profile="counts", counts=[500, 1, 1, 1, 1]), avail, 0)


def test_scenario_applies_the_profile_with_seeded_drops():
    train = torch.arange(6).repeat_interleave(50)
    test = torch.arange(6).repeat_interleave(20)
    cfg = ScenarioConfig(order=list(range(6)), initial=2, increment=2,
                         imbalance={"profile": "longtail", "ratio": 5, "ordering": "position", "apply_to_test": True})
    a = Scenario(cfg, train, test, 6, seed=1)
    want = [int(np.floor(50 * 5 ** (-i / 5) + 1e-9)) for i in range(6)]
    assert a.imbalance["train_per_class"] == want
    assert [int((a.train_pos == c).sum()) for c in range(6)] == want
    assert a.imbalance["test_per_class"] == [int(np.floor(20 * w / 50 + 0.5)) for w in want]
    assert a.state(2).train.numel() == want[4] + want[5]
    same, other = Scenario(cfg, train, test, 6, seed=1), Scenario(cfg, train, test, 6, seed=2)
    assert torch.equal(same.train_pos, a.train_pos) and not torch.equal(other.train_pos, a.train_pos)
    balanced = Scenario(ScenarioConfig(order=list(range(6))), train, test, 6, seed=1)
    assert balanced.imbalance["train_per_class"] == [50] * 6


# ----- repeated runs ---------------------------------------------------------------------------
def test_runs_repeat_with_successive_seeds_and_summarise(tmp_path):
    cfg = tiny_config(tmp_path, "runs=2", "scenario.states=2", "train.epochs=0", "state0_cache=null")
    results = run_methods(cfg, tmp_path / "rep")
    assert sorted(results) == ["finetune/run_0", "finetune/run_1"]
    seeds = [json.loads((tmp_path / "rep" / f"run_{k}" / "results.json").read_text()) for k in range(2)]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["seeds"] == [3, 4]
    assert [yaml.safe_load((tmp_path / "rep" / f"run_{k}" / "config.yaml").read_text())["seed"] for k in range(2)] == [3, 4]
    m = summary["methods"]["finetune"]["mean_incremental_top1_excl_first"]
    values = [r["states"][1]["top1"] for r in seeds]
    assert m["values"] == values and m["mean"] == pytest.approx(np.mean(values))
    assert m["std"] == pytest.approx(np.std(values)) and m["sample_std"] == pytest.approx(np.std(values, ddof=1))
    b = summary["methods"]["finetune"]["mean_incremental_balanced_top1"]
    assert b["mean"] == pytest.approx(np.mean([np.mean([s["balanced_top1"] for s in r["states"]]) for r in seeds]))


# ----- end to end ------------------------------------------------------------------------------
def active_config(tmp_path):
    return tiny_config(tmp_path, "method=active", "active.budget=0.2", "active.cycles=2", "train.epochs=1",
                       "active.classical=entropy", "active.balancing=poor", "state0_cache=null",
                       "memory.selection=random", "scenario.imbalance.profile=longtail")


def test_active_run_trains_only_on_annotated_images_and_resumes(tmp_path, monkeypatch):
    seen = []
    fit = Engine.fit

    def recording_fit(self, ctx, method, indices, *args, **kwargs):
        seen.append((ctx.state.index, ctx.round, indices.clone()))
        return fit(self, ctx, method, indices, *args, **kwargs)

    monkeypatch.setattr(Engine, "fit", recording_fit)
    cfg = active_config(tmp_path)
    run = Run(cfg, tmp_path / "full", progress=False)
    full = run.execute()
    assert [(b, r) for b, r, _ in seen] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    lines = [json.loads(t) for t in (tmp_path / "full" / "history.jsonl").read_text().splitlines()]
    assert [(x["state"], x["round"], x["epoch"]) for x in lines if x["kind"] == "epoch"] == [
        (1, 1, 1), (2, 1, 1), (2, 2, 1), (3, 1, 1), (3, 2, 1)]  # history: 1-based, a line per round's epoch
    assert full["imbalance"]["profile"] == "longtail" and len(set(full["imbalance"]["train_per_class"])) > 1
    for b in (1, 2):
        state = full["states"][b]
        s = state["active"]  # the method's own results, under its name
        pool = run.scenario.state(b).train
        record = json.loads((tmp_path / "full" / "active" / f"state_{b:02d}.json").read_text())
        total = annotation_budget(0.2, pool.numel())
        assert s["pool_size"] == pool.numel() and s["annotation_budget"] == total
        assert s["annotations_per_cycle"] == cycle_budgets(total, 2, 0.4) == [len(c) for c in record["cycles"]]
        assert s["annotations"] == total == s["labels_revealed"] == sum(s["annotations_per_class"].values())
        for r in range(2):
            trained = seen[2 * b - 1 + r][2]
            from_pool = trained[torch.isin(trained, pool)]
            annotated = torch.tensor(sum(record["cycles"][: r + 1], []))
            assert set(from_pool.tolist()) == set(annotated.tolist())  # never an unannotated image
        mem = json.loads((tmp_path / "full" / "memory" / f"state_{b:02d}.json").read_text())
        new_ids = {i for c in state["new_classes"] for i in mem["exemplars"][str(run.scenario.order[c])]}
        assert new_ids <= set(sum(record["cycles"], []))  # the memory stores annotated images only
        # the test scores are class prediction scaling with the counts trained on
        npz = np.load(tmp_path / "full" / "scores" / f"state_{b:02d}.npz")
        n_old = state["classes_seen"] - len(state["new_classes"])
        prev = json.loads((tmp_path / "full" / "memory" / f"state_{b - 1:02d}.json").read_text())["exemplars"]
        counts = [len(prev[str(run.scenario.order[c])]) for c in range(n_old)]
        counts += [s["annotations_per_class"][str(c)] for c in state["new_classes"]]
        # written out here (Belouadah et al. 2020): p = softmax(z), p'_j = p_j * N / n_j, N = sum_j n_j
        z = npz["logits"].astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        n = np.array(counts, dtype=np.float64)
        assert len(set(counts)) > 1  # the classes were not trained on equally: the scaling acts
        expected = p * np.array([n.sum() / c if c > 0 else 1.0 for c in counts])[None, :]  # n_j = 0: p_j kept
        assert np.allclose(npz["scores"], expected, rtol=1e-5, atol=1e-6)
    # killed after state 1, resumed: the same numbers
    Run(cfg, tmp_path / "cut", progress=False).execute(until_state=0)
    resumed = Run(cfg, tmp_path / "cut", progress=False).execute(resume=True)
    assert strip_timings(resumed) == strip_timings(full)


def test_the_raw_scores_beside_scaling_are_the_unscaled_variant_and_old_runs_read_so(tmp_path):
    """Issue 40 item 9: with scaling on, the raw logits are the ``unscaled`` score set (once
    ``cnn``, which names no CNN here); a results.json written under the old name reads as
    today's, so the tables of old and new runs keep one row for it. Without scaling: ``scaled``."""
    from cilkit.analysis.runsets import find_runs, group_runs
    from cilkit.analysis.tables import build_table
    from cilkit.rundir.readers import read_results
    from cilkit.settings.config import apply_overrides, validate

    def config(*overrides):
        return validate(apply_overrides(active_config(tmp_path).to_dict(), ["threads=1", *overrides]))

    on = Run(config(), tmp_path / "on", progress=False).execute()
    assert all(set(s["variants"]) == {"unscaled"} for s in on["states"])
    off = Run(config("active.scaling=false"), tmp_path / "off", progress=False).execute(until_state=0)
    assert set(off["states"][0]["variants"]) == {"scaled"}
    (protocol,) = group_runs(find_runs([tmp_path / "on"]))
    assert [row[0] for row in build_table(protocol.groups).rows] == ["active", "active [unscaled]"]
    old = json.loads((tmp_path / "on" / "results.json").read_text())
    for s in old["states"]:
        s["variants"] = {"cnn": s["variants"].pop("unscaled")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_results(tmp_path / "old.json") == read_results(tmp_path / "on" / "results.json")


@pytest.mark.parametrize("renormalise", [True, False])
def test_the_renormalise_option_reaches_the_acquisition_function(tmp_path, monkeypatch, renormalise):
    seen = []
    pick = af.entropy_pick
    monkeypatch.setattr(af, "entropy_pick", lambda probs, k: seen.append(probs) or pick(probs, k))
    cfg = tiny_config(tmp_path, "method=active", "active.budget=0.2", "active.cycles=1", "train.epochs=1",
                      "active.classical=entropy", "active.balancing=none", "scenario.states=2",
                      f"active.renormalise={str(renormalise).lower()}", "memory.selection=random", "threads=1")
    Run(cfg, tmp_path / "r", progress=False).execute()
    sums = seen[0].sum(dim=1)
    assert torch.allclose(sums, torch.ones_like(sums)) == renormalise


@pytest.mark.parametrize("reinit", [True, False])
def test_reinit_classifier_builds_a_new_last_layer_each_state(tmp_path, reinit):
    cfg = tiny_config(tmp_path, "method=active", f"active.reinit_classifier={str(reinit).lower()}",
                      "train.epochs=1", "memory.selection=random", "threads=1")
    run = Run(cfg, tmp_path / "r", progress=False)
    run.execute(until_state=0)
    trained = run.model.head.weight.detach().clone()
    ctx = run.context(1)
    run.method.before_state(ctx)
    old_rows = ctx.model.head.weight.detach()[: ctx.state.n_old]
    assert ctx.model.head.num_classes == ctx.state.n_seen
    assert torch.equal(old_rows, trained) != reinit  # re-initialised, or kept
    assert torch.equal(ctx.teacher.head.weight, trained)  # the first cycle still selects with the trained layer
    for name, p in ctx.model.backbone.state_dict().items():  # the backbone continues either way
        assert torch.equal(p, ctx.teacher.backbone.state_dict()[name])


def test_the_active_configs_load_with_the_paper_protocol():
    configs = Path(__file__).resolve().parents[1] / "configs"
    cifar = load_config(configs / "active-cifar100.yaml")
    assert (cifar.runs, cifar.memory.total, cifar.scenario.increment, cifar.model.backbone) == (5, 1000, 10, "resnet32")
    fm = load_config(configs / "active-fashion-mnist.yaml")
    assert fm.scenario.imbalance.profile == "longtail" and fm.scenario.imbalance.ratio == 10
    for cfg in (cifar, fm):
        opts = cfg.method_options("active")
        assert (opts["budget"], opts["cycles"], opts["first_share"]) == (0.05, 4, 0.4)
    # the original's new last layer per state and incremental batch of 32; the recorded
    # Fashion-MNIST figures kept the classifier rows
    assert cifar.method_options("active")["reinit_classifier"] and cifar.train.batch_size == 32
    assert not fm.method_options("active")["reinit_classifier"]
