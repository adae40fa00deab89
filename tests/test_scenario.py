import numpy as np
import pytest
import torch

from cilkit.settings.config import ScenarioConfig
from cilkit.common.errors import UserError
from cilkit.cil.scenario import Scenario, class_order


def make(cfg, n_classes=10, per_class=6, test_per_class=3, seed=0):
    train = torch.arange(n_classes).repeat_interleave(per_class)
    test = torch.arange(n_classes).repeat_interleave(test_per_class)
    return Scenario(cfg, train, test, n_classes, seed), train, test


def test_order_follows_the_icarl_seed_convention():
    np.random.seed(1993)
    assert class_order(1993, 100) == np.random.permutation(100).tolist()


def test_states_partition_classes_without_leaks():
    sc, train, test = make(ScenarioConfig(initial=4, increment=2, order=7))
    assert sc.num_states == 4
    seen_train = set()
    for b in range(sc.num_states):
        st = sc.state(b)
        classes = {sc.position_of[int(c)].item() for c in train[st.train].unique()}
        assert classes == set(st.new), "train data of state b = exactly its new classes"
        assert not (set(st.train.tolist()) & seen_train), "no training image reused across states"
        seen_train |= set(st.train.tolist())
        test_classes = set(sc.test_pos[st.test].tolist())
        assert test_classes == set(range(st.n_seen)), "test set of state b = all seen classes"
        assert st.test.numel() == 3 * st.n_seen


def test_explicit_order_and_positions():
    sc, train, _ = make(ScenarioConfig(order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], initial=2, increment=4))
    st = sc.state(1)
    assert sorted(train[st.train].unique().tolist()) == [4, 5, 6, 7]
    assert sc.position_of[9] == 0 and sc.position_of[0] == 9


def test_validation_holdout_is_balanced_and_disjoint():
    sc, train, _ = make(ScenarioConfig(initial=2, increment=2, val_per_class=2), seed=3)
    for b in range(sc.num_states):
        st = sc.state(b)
        assert not set(st.val.tolist()) & set(st.train.tolist())
        counts = torch.bincount(sc.train_pos[st.val])[st.new.start :]
        assert counts.tolist() == [2] * st.n_new
    # same seed, same hold-out
    sc2, _, _ = make(ScenarioConfig(initial=2, increment=2, val_per_class=2), seed=3)
    assert torch.equal(sc.val_mask, sc2.val_mask)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ScenarioConfig(initial=8, increment=2, states=3), "12 classes"),
        (ScenarioConfig(initial=11, increment=1), "has 10 classes"),
        (ScenarioConfig(order=[0, 1, 1, 2]), "appears twice"),
        (ScenarioConfig(order=[0, 12]), "outside"),
        (ScenarioConfig(val_per_class=6), "val_per_class"),
    ],
)
def test_impossible_protocols(cfg, message):
    with pytest.raises(UserError, match=message):
        make(cfg)


def test_an_increment_that_leaves_classes_unlearned_is_refused_unless_states_is_set():
    with pytest.raises(UserError, match=r"scenario.increment.*last 2 of the 10 classes.*unlearned; use an "
                                        r"increment of 1, 2, 4, 8, or set scenario.states"):
        make(ScenarioConfig(initial=2, increment=3))
    sc, _, _ = make(ScenarioConfig(initial=2, increment=3, states=3))  # fewer states on purpose
    assert sc.ends == [2, 5, 8]
