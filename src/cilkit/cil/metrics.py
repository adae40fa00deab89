"""Class-incremental metrics: top-k, old/new, balanced accuracy, accuracy matrix, forgetting.

Labels and score columns are class *positions* in the run's class order (0..n_seen-1), so the
classes of state b are a contiguous range. Accuracies are percentages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cilkit.cil.shots import add_shot_figures, shot_summary

__all__ = ["Results", "accuracy_per_state", "add_shot_figures", "average_forgetting", "balanced_accuracy", "fmt",
           "mean_incremental", "new_class_share", "run_summary", "score_metrics", "state_accuracies",
           "topk_correct", "variant_names"]

Results = Mapping[str, Mapping[str, Any]]  # label -> results.json content, in display order


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for a missing figure, strings as they are, numbers to ``digits``."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def variant_names(results: Mapping[str, Any]) -> list[str]:
    """The extra score sets a run reports beside its primary one (e.g. iCaRL's ``cnn``)."""
    names: dict[str, None] = {}
    for s in results["states"]:
        names.update(dict.fromkeys(s.get("variants", {})))
    return list(names)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (N,): is the label among the ``k`` highest scores (k capped at #columns)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def _pct(mask: torch.Tensor) -> float | None:
    return None if mask.numel() == 0 else 100.0 * mask.double().mean().item()


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Macro accuracy: the mean over classes present in ``labels`` of each class's recall."""
    if labels.numel() == 0:
        return None
    classes = labels.unique()
    correct = (pred == labels).double()
    per_class = torch.stack([correct[labels == c].mean() for c in classes])
    return 100.0 * per_class.mean().item()


def state_accuracies(scores: torch.Tensor, labels: torch.Tensor, n_old: int) -> dict[str, float | None]:
    """Top-1, top-5, top-1 on old classes (< n_old), on new classes, and balanced top-1."""
    pred = scores.argmax(dim=1)
    correct = pred == labels
    old = labels < n_old
    return {
        "top1": _pct(correct),
        "top5": _pct(topk_correct(scores, labels, 5)),
        "top1_old": _pct(correct[old]) if n_old > 0 else None,
        "top1_new": _pct(correct[~old]),
        "balanced_top1": balanced_accuracy(pred, labels),
    }


def accuracy_per_state(scores: torch.Tensor, labels: torch.Tensor, state_ends: Sequence[int]) -> list[float | None]:
    """Top-1 (over all seen classes' scores) on the test images of each state's classes.

    ``state_ends[s]`` is the first class position after state s, so state s owns positions
    ``state_ends[s-1]..state_ends[s]-1``. One row of the accuracy matrix.
    """
    correct = scores.argmax(dim=1) == labels
    row, start = [], 0
    for end in state_ends:
        mask = (labels >= start) & (labels < end)
        row.append(_pct(correct[mask]))
        start = end
    return row


def mean_incremental(values: Sequence[float], skip_first: bool = False) -> float | None:
    """Mean over states; ``skip_first`` excludes state 0 (as IL2M / active IL report)."""
    vals = list(values[1:] if skip_first else values)
    return sum(vals) / len(vals) if vals else None


def average_forgetting(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """Average forgetting (Chaudhry et al., 2018) after the last state.

    ``matrix[b][s]`` is the accuracy after state b on the classes of state s (s <= b). For each
    state s before the last, forgetting is the best accuracy it ever had before the last state
    minus its accuracy now; the result is the mean over those states (None with one state).
    """
    last = len(matrix) - 1
    if last < 1:
        return None
    drops = []
    for s in range(last):
        before = [a for b in range(s, last) if (a := matrix[b][s]) is not None]
        now = matrix[last][s]
        if before and now is not None:
            drops.append(max(before) - now)
    return sum(drops) / len(drops) if drops else None


def new_class_share(scores: torch.Tensor, n_old: int) -> float:
    """Share (%) of test predictions that fall into the classes new in this state."""
    return 100.0 * (scores.argmax(dim=1) >= n_old).float().mean().item()


def score_metrics(
    scores: torch.Tensor, labels: torch.Tensor, n_old: int, state_ends: Sequence[int]
) -> dict[str, float | list[float | None] | None]:
    """A state's figures in results.json for one score matrix: :func:`state_accuracies`,
    ``new_class_share`` and ``accuracy_per_state`` (its row of the accuracy matrix). Shared by
    the runner and ``cilkit calibrate``."""
    out: dict[str, float | list[float | None] | None] = dict(state_accuracies(scores, labels, n_old))
    out["new_class_share"] = new_class_share(scores, n_old)
    out["accuracy_per_state"] = accuracy_per_state(scores, labels, state_ends)
    return out


def run_summary(states: Sequence[dict], matrix: Sequence[Sequence[float | None]]) -> dict[str, float | None]:
    """A run's summaries in results.json: mean incremental top-1, top-5 and balanced top-1,
    each with and without state 0, and average forgetting. A mean over a state without a value
    (e.g. balanced top-1 of an empty test set) is None. A long-tailed run adds its many-, medium-
    and few-shot summaries (:func:`cilkit.cil.shots.shot_summary`)."""
    out: dict[str, float | None] = {}
    for key in ("top1", "top5", "balanced_top1"):
        values = [s.get(key) for s in states]
        for suffix, skip in (("", False), ("_excl_first", True)):
            kept = values[1:] if skip else values
            known = [v for v in kept if v is not None]
            out[f"mean_incremental_{key}{suffix}"] = mean_incremental(known) if len(known) == len(kept) else None
    out["average_forgetting"] = average_forgetting(matrix)
    out.update(shot_summary(states))
    if states and all("val_top1" in s for s in states):  # runs with a validation hold-out
        val: list[float | None] = [s["val_top1"] for s in states]
        for suffix, kept in (("", val), ("_excl_first", val[1:])):
            known = [v for v in kept if v is not None]
            out[f"mean_incremental_val_top1{suffix}"] = mean_incremental(known) if len(known) == len(kept) else None
    return out
