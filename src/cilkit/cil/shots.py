"""Many-, medium- and few-shot top-1: the long-tail literature's accuracy by class size.

Liu et al., "Large-Scale Long-Tailed Recognition in an Open World" (OLTR, CVPR 2019, Sec. 5)
split the classes by their number of training images: *many-shot* more than 100, *medium-shot*
20 to 100, *few-shot* fewer than 20 (``scenario.imbalance.shots.many`` and ``.few``; a class with
exactly ``many`` images is medium-shot, one with exactly ``few`` too). A class's group is fixed by
its training images in the (long-tailed) training set, ``imbalance.train_per_class`` of
results.json (kept before the validation hold-out), never by its exemplars in memory.

The figure of a group is plain top-1 (%) over the test images of the group's *seen* classes,
with the scores over every seen class (the same predictions as ``top1``). On a balanced test set
(the long-tailed protocols' default: the imbalance on the training set only) this equals the
mean of the group's per-class accuracies, which OLTR's code computes; with
``scenario.imbalance.apply_to_test`` the larger classes of a group weigh more, as in ``top1``.
A group without a seen class has no figure (None). Only a run whose scenario has an imbalance
profile records these figures: a balanced run's results.json has none of the keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

SHOT_GROUPS = ("many", "medium", "few")
SHOT_KEYS = tuple(f"{g}_shot_top1" for g in SHOT_GROUPS)  # a state's figures in results.json
DEFAULT_MANY, DEFAULT_FEW = 100, 20  # as ShotGroups in cilkit.settings.config


def shot_groups(train_per_class: torch.Tensor | Sequence[int], many: int = DEFAULT_MANY,
                few: int = DEFAULT_FEW) -> torch.Tensor:
    """(C,) each class position's group: 0 many-shot (count > ``many``), 2 few-shot (count <
    ``few``), 1 medium-shot (the others)."""
    counts = torch.as_tensor(train_per_class, dtype=torch.int64)
    groups = torch.ones_like(counts)
    groups[counts > many] = 0
    groups[counts < few] = 2
    return groups


def shot_accuracies(scores: torch.Tensor, labels: torch.Tensor, train_per_class: torch.Tensor | Sequence[int],
                    many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> dict[str, float | None]:
    """``{many,medium,few}_shot_top1``: top-1 (%) over the test images (``labels``: class
    positions, all seen) whose class is in the group, the prediction the argmax of ``scores``
    (N, n_seen); None for a group without such an image."""
    correct = (scores.argmax(dim=1) == labels).double()
    group = shot_groups(train_per_class, many, few)[labels]
    totals = torch.bincount(group, minlength=3).double()
    hits = torch.bincount(group, weights=correct, minlength=3)
    return {k: (100.0 * (hits[g] / totals[g]).item() if totals[g] > 0 else None) for g, k in enumerate(SHOT_KEYS)}


def thresholds(record: Mapping[str, Any]) -> tuple[int, int]:
    """``(many, few)`` of an imbalance record (results.json ``imbalance``; the defaults for a
    record written before the thresholds were kept in it)."""
    shots = record.get("shots") or {}
    return int(shots.get("many", DEFAULT_MANY)), int(shots.get("few", DEFAULT_FEW))


def is_long_tailed(record: Mapping[str, Any] | None) -> bool:
    """The scenario has an imbalance profile (and the counts per class that place the groups)."""
    if not record:
        return False
    return record.get("profile", "none") != "none" and bool(record.get("train_per_class"))


def add_shot_figures(entry: dict[str, Any], scores: torch.Tensor, extras: Mapping[str, torch.Tensor],
                     labels: torch.Tensor, record: Mapping[str, Any] | None) -> None:
    """Put the state's :func:`shot_accuracies` into its results.json ``entry`` (the primary
    scores) and into each score set of ``entry["variants"]`` (``extras``), only when the
    scenario's imbalance ``record`` has a profile; a balanced run's entry is left as it is."""
    if record is None or not is_long_tailed(record):
        return
    many, few = thresholds(record)
    counts = record["train_per_class"]
    entry.update(shot_accuracies(scores, labels, counts, many, few))
    variants = entry.setdefault("variants", {})
    for name, extra in extras.items():
        variants.setdefault(name, {}).update(shot_accuracies(extra, labels, counts, many, few))


def present_mean(values: Sequence[float | None], skip_first: bool = False) -> float | None:
    """The mean incremental figure of a group: the mean over the states (without the first with
    ``skip_first``) in which the group has a seen class, None when it has none there. A group's
    figure is undefined, not zero, before its first class arrives, so those states are left out."""
    known = [v for v in (values[1:] if skip_first else values) if v is not None]
    return sum(known) / len(known) if known else None


def shot_summary(states: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """A long-tailed run's summaries of each group: ``mean_incremental_<g>_shot_top1`` (with and
    without state 0, :func:`present_mean`) and ``last_<g>_shot_top1``, the figure after the last
    state; empty for a run whose states have no such figure (a balanced one)."""
    out: dict[str, float | None] = {}
    for key in SHOT_KEYS:
        if not states or not any(key in s for s in states):
            continue
        values = [s.get(key) for s in states]
        out[f"mean_incremental_{key}"] = present_mean(values)
        out[f"mean_incremental_{key}_excl_first"] = present_mean(values, skip_first=True)
        out[f"last_{key}"] = values[-1]
    return out


def has_shot_figures(results: Mapping[str, Any]) -> bool:
    """Some state of a run's results.json has a many-, medium- or few-shot figure."""
    return any(k in s for s in results.get("states", ()) for k in SHOT_KEYS)


def shots_sentence(results: Mapping[str, Any]) -> str:
    """The groups of a long-tailed run in words (empty for a run without shot figures): what the
    protocol headers add after the imbalance profile."""
    if not has_shot_figures(results):
        return ""
    many, few = thresholds(results.get("imbalance") or {})
    scaled = ("" if (many, few) == (DEFAULT_MANY, DEFAULT_FEW)
              else " (scaled from the long-tail literature's 100 and 20)")
    return (f" Shot groups by training images per class: many-shot more than {many}, medium-shot {few} to "
            f"{many}, few-shot fewer than {few}{scaled}; top-1 on their seen classes' test images.")
