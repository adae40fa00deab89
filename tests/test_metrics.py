"""Metrics on hand-computed inputs (parametrised, as continuum tests its metrics)."""

import math

import pytest
import torch

from cilkit.cil.metrics import (
    accuracy_per_state,
    average_forgetting,
    balanced_accuracy,
    mean_incremental,
    new_class_share,
    state_accuracies,
    topk_correct,
)


def onehot_scores(preds, n):
    s = torch.zeros(len(preds), n)
    s[torch.arange(len(preds)), torch.tensor(preds)] = 1.0
    return s


@pytest.mark.parametrize(
    "matrix, expected",
    [
        ([[100.0]], None),
        ([[100.0], [25.0, 25.0]], 75.0),
        ([[90.0], [80.0, 70.0], [60.0, 50.0, 40.0]], ((90 - 60) + (70 - 50)) / 2),
        # forgetting uses the best accuracy ever reached, not the first one
        ([[50.0], [70.0, 90.0], [40.0, 90.0, 80.0]], ((70 - 40) + (90 - 90)) / 2),
        ([[80.0], [85.0, 60.0]], -5.0),  # backward transfer shows as negative forgetting
    ],
)
def test_average_forgetting(matrix, expected):
    got = average_forgetting(matrix)
    assert got == expected if expected is None else math.isclose(got, expected)


@pytest.mark.parametrize(
    "values, skip_first, expected",
    [([80.0, 60.0, 40.0], False, 60.0), ([80.0, 60.0, 40.0], True, 50.0), ([80.0], True, None)],
)
def test_mean_incremental(values, skip_first, expected):
    assert mean_incremental(values, skip_first) == expected


def test_state_accuracies_old_new_top5_balanced():
    # 4 classes seen, 2 old (0, 1); labels and predictions chosen by hand.
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    preds = [0, 2, 1, 2, 2, 3]  # correct: yes, no, yes, yes, no, yes
    acc = state_accuracies(onehot_scores(preds, 4), labels, n_old=2)
    assert math.isclose(acc["top1"], 100 * 4 / 6)
    assert math.isclose(acc["top1_old"], 100 * 2 / 3)
    assert math.isclose(acc["top1_new"], 100 * 2 / 3)
    assert acc["top5"] == 100.0  # only 4 classes: every label is in the top 5
    # per-class recall: c0 1/2, c1 1, c2 1, c3 1/2 -> mean 0.75
    assert math.isclose(acc["balanced_top1"], 75.0)


def test_top_k_ranks():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.02, 0.08]])
    labels = torch.tensor([2, 1])
    assert topk_correct(scores, labels, 1).tolist() == [False, False]
    assert topk_correct(scores, labels, 2).tolist() == [True, False]


def test_no_old_classes_at_state_zero():
    acc = state_accuracies(onehot_scores([0, 1], 2), torch.tensor([0, 1]), n_old=0)
    assert acc["top1_old"] is None and acc["top1_new"] == 100.0


def test_accuracy_per_state_rows():
    # states own positions [0,2), [2,3), [3,5)
    labels = torch.tensor([0, 1, 2, 3, 4, 4])
    preds = [0, 0, 2, 4, 4, 0]
    row = accuracy_per_state(onehot_scores(preds, 5), labels, [2, 3, 5])
    assert row[0] == 50.0 and row[1] == 100.0 and math.isclose(row[2], 100 / 3)


def test_balanced_accuracy_weights_classes_equally():
    labels = torch.tensor([0] * 9 + [1])
    pred = torch.zeros(10, dtype=torch.long)
    assert balanced_accuracy(pred, labels) == 50.0


def test_new_class_share():
    assert new_class_share(onehot_scores([0, 2, 3, 3], 4), n_old=2) == 75.0
