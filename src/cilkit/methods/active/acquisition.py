"""Sample acquisition functions of active class-incremental learning (Belouadah, Popescu,
Aggarwal & Saci, "Active class incremental learning for imbalanced datasets", IPCV workshop at
ECCV 2020; docs/methods.md, "active").

Every function works on a pool of ``n`` unlabelled candidates described only by what a model
says about them (probabilities ``(n, C)`` or features ``(n, D)``) and, for the balancing
functions, by the labels the oracle revealed for the images annotated so far. None of them
reads a pool label: the balancing functions get each new label through the ``annotate``
callback, i.e. from the oracle, one annotation at a time. Each returns the candidate rows it
picks, in pick order (``k`` of them, fewer only if the pool is smaller).

Classical functions: :func:`random_pick`, :func:`entropy_pick`, :func:`margin_pick`,
:func:`kcenter_pick` (k-center greedy core-set, Sener & Savarese, ICLR 2018), and
:func:`least_confidence_pick`, which is cilkit's addition (the original code,
``ail/codes/classical_AFs.py``, has random, k-centers, entropy and max-margin only).
Balancing functions: :func:`poor_pick`, :func:`bcore_pick`. Helpers:
:func:`acquisition_probabilities` (softmax, optionally with class prediction scaling, then
renormalised or, as the original, not) and :func:`minmax_normalise` (the feature space of
k-center, poor and bcore).

``bcore`` as released cannot run: ``main.py`` builds the distance matrix only when
``'kcenters'`` is one of the configured functions (``dist_matrix`` stays ``None`` for
``balancing_AF = 'bcore'``, and ``bcore`` indexes it from its second pick), and it writes the
annotated images' feature file (which ``bcore`` reads for the class means) only when the
balancing function is ``poor``. cilkit implements the described intent (paper, Sec. 3.2):
the minority/majority rule on class means of the annotated images, then the k-center greedy
step on the pool features.

Ties are broken by the lower candidate row (stable sorts, first arg-min / arg-max).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from cilkit.cil.rectify import prediction_scaling
from cilkit.cil.classwise import class_counts

Annotate = Callable[[int], int]  # candidate row -> class position revealed by the oracle


# ----- inputs --------------------------------------------------------------------------------
def acquisition_probabilities(
    logits: torch.Tensor,
    counts: torch.Tensor | Sequence[int] | None = None,
    renormalise: bool = True,
) -> torch.Tensor:
    """``softmax(z)``, or with ``counts`` the class prediction scaling of the paper,
    ``p'_j = p_j * N / n_j`` where ``n_j > 0`` (:func:`cilkit.cil.rectify.prediction_scaling`).

    ``renormalise`` (cilkit's default): the scaled scores are divided by their row sum, so that
    entropy, margin and least confidence see a distribution. ``renormalise=False`` is the
    original code's form (``main.py`` scales the softmax in ``th_calibration`` and pickles the
    result, which ``entropy`` and ``max_margin`` read as is). The two rank candidates
    differently for every function that compares rows: each row has its own normaliser, so
    entropy, margin *and* least confidence (the top score) can all change their picks
    (``tests/test_active.py`` shows one pool where each does)."""
    if counts is None:
        return torch.softmax(logits.double(), dim=1)
    scaled = prediction_scaling(logits.double(), counts).double()
    return scaled / scaled.sum(dim=1, keepdim=True) if renormalise else scaled


def minmax_normalise(features: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation per dimension over the rows (the pool): ``(f - min) / (max - min)``,
    0 on a constant dimension (as the original code's ``min_max``). Float64."""
    f = features.double()
    lo, hi = f.min(dim=0).values, f.max(dim=0).values
    span = hi - lo
    return torch.where(span > 0, (f - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(f))


# ----- classical functions ---------------------------------------------------------------------
def _top(score: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    return torch.sort(score, descending=descending, stable=True).indices[: min(k, score.numel())]


def random_pick(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` of ``n`` candidates uniformly at random (seeded)."""
    return torch.randperm(n, generator=generator)[: min(k, n)]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(n,) Shannon entropy ``-sum_j p_j log p_j`` (natural log; 0 log 0 = 0). On unnormalised
    scaled scores it is the original's expression (which uses log base 2: the same ranking)."""
    p = probs.double()
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)


def entropy_pick(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` candidates of highest entropy (flattest distributions) first."""
    return _top(entropy(probs), k, descending=True)


def margin(probs: torch.Tensor) -> torch.Tensor:
    """(n,) ``p1 - p2``, the gap between the two highest probabilities (``p1`` with one class)."""
    if probs.shape[1] < 2:
        return probs[:, 0].double()
    top2 = probs.double().topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def margin_pick(probs: torch.Tensor, k: int, order: Literal["standard", "original"] = "standard") -> torch.Tensor:
    """Margin sampling. ``standard``: the smallest gaps ``p1 - p2`` first (the most ambiguous
    candidates). ``original``: the largest gaps first, which is what the original code's
    ``max_margin`` does (it sorts the margins in reverse); offered to reproduce it."""
    return _top(margin(probs), k, descending=order == "original")


def least_confidence_pick(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` candidates with the lowest top probability (highest ``1 - max_j p_j``) first.
    cilkit's addition: the original code has no least-confidence function."""
    return _top(probs.double().max(dim=1).values, k, descending=False)


def _farthest(min_dist: torch.Tensor | None, allowed: torch.Tensor, generator: torch.Generator) -> int:
    """The k-center greedy step: the allowed candidate farthest from its nearest centre; a
    seeded random allowed candidate when there is no centre yet."""
    rows = allowed.nonzero().flatten()
    if min_dist is None:
        return int(rows[torch.randint(rows.numel(), (1,), generator=generator)])
    return int(rows[min_dist[rows].argmax()])


def _closer(min_dist: torch.Tensor | None, features: torch.Tensor, i: int) -> torch.Tensor:
    d = (features - features[i]).norm(dim=1)
    return d if min_dist is None else torch.minimum(min_dist, d)


def _centre_distances(features: torch.Tensor, centres: torch.Tensor | None) -> torch.Tensor | None:
    if centres is None or centres.shape[0] == 0:
        return None
    return torch.cdist(features.double(), centres.double()).min(dim=1).values


def greedy_kcenter(
    features: torch.Tensor,
    k: int,
    generator: torch.Generator,
    centres: torch.Tensor | None = None,
    restrict: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_pick: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The k-center greedy loop shared by ``kcenter`` and ``bcore``: ``k`` times, the allowed
    candidate farthest from its nearest centre becomes a centre. ``restrict(remaining)`` may
    narrow the candidates before each pick; ``on_pick(i)`` runs after it."""
    min_dist = _centre_distances(features, centres)
    remaining = torch.ones(features.shape[0], dtype=torch.bool)
    picks: list[int] = []
    for _ in range(min(k, features.shape[0])):
        i = _farthest(min_dist, restrict(remaining) if restrict else remaining, generator)
        picks.append(i)
        remaining[i] = False
        if on_pick is not None:
            on_pick(i)
        min_dist = _closer(min_dist, features, i)
    return torch.tensor(picks, dtype=torch.int64)


def kcenter_pick(
    features: torch.Tensor, k: int, generator: torch.Generator, centres: torch.Tensor | None = None
) -> torch.Tensor:
    """k-center greedy core-set (Sener & Savarese, ICLR 2018): repeatedly pick the candidate
    whose Euclidean distance to its nearest centre is largest; each pick becomes a centre.
    ``centres`` are the features of the images already annotated in the state (the usual
    core-set reading); with none, the first pick is a seeded random candidate, as in the
    original code (which also ignores earlier annotations in later cycles)."""
    return greedy_kcenter(features.double(), k, generator, centres)


# ----- balancing functions ---------------------------------------------------------------------
@dataclass
class ClassStats:
    """Counts ``n_c`` and feature sums of the annotated images of the state, per class position;
    the class means ``mu_c`` are ``sums / counts`` for the classes with ``n_c > 0``."""

    counts: torch.Tensor  # (C,) int64
    sums: torch.Tensor  # (C, D) float64

    @classmethod
    def of(cls, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> "ClassStats":
        f = features.double()
        sums = torch.zeros(n_classes, f.shape[1], dtype=torch.float64).index_add_(0, labels, f)
        return cls(class_counts(labels, n_classes).clone(), sums)

    def add(self, label: int, feature: torch.Tensor) -> None:
        self.counts[label] += 1
        self.sums[label] += feature.double()

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    def minority(self) -> torch.Tensor:
        """(C,) bool: present classes with ``n_c < floor(mean n)`` (mean over present classes);
        the majority classes are the other present ones."""
        if not bool(self.present.any()):
            return self.present.clone()
        threshold = torch.floor(self.counts[self.present].double().mean())
        return self.present & (self.counts.double() < threshold)

    def mean_distances(self, features: torch.Tensor) -> torch.Tensor:
        """(n, C) ``||x - mu_c||``; +inf for a class without annotation."""
        means = self.sums / self.counts.clamp_min(1)[:, None].double()
        d = torch.cdist(features.double(), means)
        return torch.where(self.present[None, :], d, torch.full_like(d, float("inf")))


def poor_pick(
    features: torch.Tensor,
    k: int,
    stats: ClassStats,
    annotate: Annotate,
    generator: torch.Generator,
) -> torch.Tensor:
    """``poor`` (Belouadah et al. 2020): serve the poorest classes first. While budget is left,
    for each class ``c`` with the minimum count among the annotated classes (in position
    order; a class whose count changed meanwhile is skipped until the next round), annotate

        argmin_x  ||x - mu_c|| - min_{m in majority} ||x - mu_m||

    over the remaining candidates, then update counts, means and the minority / majority split
    with the revealed label (which may be any class, even one not annotated before). ``stats``
    is updated in place. With no annotated image at all, one seeded random candidate is
    annotated first (no class mean exists yet)."""
    f = features.double()
    n = f.shape[0]
    taken = torch.zeros(n, dtype=torch.bool)
    picks: list[int] = []

    def take(i: int) -> None:
        label = annotate(i)
        picks.append(i)
        taken[i] = True
        stats.add(label, f[i])

    k = min(k, n)
    if k > 0 and not bool(stats.present.any()):
        take(_farthest(None, ~taken, generator))
    while len(picks) < k:
        rarest = stats.counts[stats.present].min()
        for c in (stats.present & (stats.counts == rarest)).nonzero().flatten().tolist():
            if len(picks) >= k:
                break
            if stats.counts[c] != rarest:
                continue
            dist = stats.mean_distances(f)
            majority = stats.present & ~stats.minority()
            score = dist[:, c] - dist[:, majority].min(dim=1).values
            score[taken] = float("inf")
            take(int(score.argmin()))
    return torch.tensor(picks, dtype=torch.int64)


def bcore_pick(
    features: torch.Tensor,
    k: int,
    stats: ClassStats,
    annotate: Annotate,
    generator: torch.Generator,
    centres: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bcore`` (Belouadah et al. 2020): balanced core-set. Before each pick the candidates
    are restricted to those nearer a minority class mean than any majority one,

        min_{m in minority} ||x - mu_m|| - min_{m in majority} ||x - mu_m|| <= 0,

    (all remaining candidates if there is no minority class or none satisfies the rule), and
    the k-center greedy step (:func:`kcenter_pick`) picks among them; the revealed label then
    updates counts, means and the minority / majority split. ``stats`` is updated in place.
    The released code cannot run this function (module docstring); this is its described
    intent."""
    f = features.double()

    def minority_side(remaining: torch.Tensor) -> torch.Tensor:
        minority = stats.minority()
        majority = stats.present & ~minority
        if bool(minority.any()) and bool(majority.any()):
            dist = stats.mean_distances(f)
            rule = dist[:, minority].min(dim=1).values - dist[:, majority].min(dim=1).values <= 0
            if bool((rule & remaining).any()):
                return rule & remaining
        return remaining

    def reveal(i: int) -> None:
        stats.add(annotate(i), f[i])

    return greedy_kcenter(f, k, generator, centres, restrict=minority_side, on_pick=reveal)
