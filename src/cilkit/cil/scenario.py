"""Class order, states, and the per-state train / validation / test indices.

A scenario only splits: it maps each original class id to its *position* in the class order,
so that state b owns a contiguous range of positions, and hands out index tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cilkit.cil.classwise import class_counts
from cilkit.settings.config import ImbalanceConfig, ScenarioConfig
from cilkit.common.errors import UserError
from cilkit.common.seeding import seeded_generator


def describe_imbalance(record: Mapping[str, Any] | None) -> str:
    """The imbalance profile of a scenario's record (:attr:`Scenario.imbalance`, results.json's
    ``imbalance``) in words: kind, ratio (or counts), the range of training images per class,
    whether the test set has it too; empty for a balanced stream (and for results without the
    record). The one text of it: a run's first line and every protocol header (console table,
    table.md, report.html, table.tex) end with it."""
    if not record or record.get("profile", "none") == "none":
        return ""
    kind = record["profile"]
    shape = {"longtail": f", ratio {record.get('ratio')}",
             "step": f", ratio {record.get('ratio')}, minority fraction {record.get('minority_fraction')}"}.get(kind, "")
    train = [n for n in record.get("train_per_class") or [] if n is not None]
    counts = f"; {max(train)} to {min(train)} training images per class" if train else ""
    test = "applied to the test set too" if record.get("apply_to_test") else "the test set balanced"
    return f" Imbalance: {kind}{shape}{counts}; {test}."


def class_order(order: int | list[int], num_classes: int) -> list[int]:
    """``numpy.random.seed(s); numpy.random.permutation(C)`` (the iCaRL convention used by BiC
    and LUCIR) for an int, or the explicit list (IL2M / active IL take it from a file)."""
    if isinstance(order, int):
        return np.random.RandomState(order).permutation(num_classes).tolist()
    bad = [c for c in order if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"config key 'scenario.order': class {bad[0]} is outside 0..{num_classes - 1}")
    if len(set(order)) != len(order):
        dup = next(c for c in order if order.count(c) > 1)
        raise UserError(f"config key 'scenario.order': class {dup} appears twice")
    return list(order)


def imbalance_ranks(cfg: ImbalanceConfig, n_classes: int, seed: int, labels: list[int] | None = None) -> torch.Tensor:
    """(C,) the size rank of each class position (0 = largest): the positions themselves
    (``ordering: position``), the rank of each position's class id among the dataset's classes
    (``label``: the id itself; ``labels`` is the run's whole class order), a seeded torch
    permutation (``shuffled``) or numpy's (``numpy_shuffled``: ``numpy.random.seed(seed)`` then a
    shuffle of the counts, LT-CIL's list-file loader for its shuffled scenario)."""
    if cfg.ordering == "position":
        return torch.arange(n_classes)
    if cfg.ordering == "label":
        if labels is None or len(labels) < n_classes:
            raise ValueError("ordering 'label' needs the class ids of the scenario's positions")
        by_label = torch.tensor(labels).argsort()  # every class of the dataset (the full order)
        ranks = torch.empty(len(labels), dtype=torch.int64).scatter_(0, by_label, torch.arange(len(labels)))
        return ranks[:n_classes]
    if cfg.ordering == "numpy_shuffled":
        return torch.from_numpy(np.random.RandomState(seed).permutation(n_classes))
    return torch.randperm(n_classes, generator=seeded_generator(seed, "imbalance-order"))


def imbalance_counts(cfg: ImbalanceConfig, available: torch.Tensor, seed: int,
                     labels: list[int] | None = None) -> torch.Tensor:
    """(C,) training images kept per class position, given the ``available`` ones.

    * ``longtail`` (exponential profile of Cui et al., CVPR 2019 / Cao et al., NeurIPS 2019):
      the class of rank r keeps ``floor(n_max * ratio^(-r / (C-1)))``;
    * ``step`` (Buda et al., 2018): the ``round(minority_fraction * C)`` classes of the last
      ranks keep ``floor(n_max / ratio)``, the others ``n_max``;
    * ``counts``: ``counts[c]`` for class position c.

    ``n_max`` is the largest available count; a class never keeps more than it has, nor fewer
    than one image.
    """
    n = available.numel()
    if cfg.profile == "none":
        return available.clone()
    if cfg.profile == "counts":
        counts = cfg.counts or []
        if len(counts) < n:
            raise UserError(f"config key 'scenario.imbalance.counts': {len(counts)} counts for "
                            f"the {n} classes of the scenario (one per class position)")
        want = torch.tensor(counts[:n], dtype=torch.int64)
        over = (want > available).nonzero().flatten()
        if over.numel():
            c = int(over[0])
            raise UserError(f"config key 'scenario.imbalance.counts': class position {c} asks for "
                            f"{int(want[c])} images but has {int(available[c])}")
        return want
    ranks = imbalance_ranks(cfg, n, seed, labels).double()
    n_max = float(available.max())
    if cfg.profile == "longtail":
        # ``label``: the profile spans the dataset's classes, a class's count its id's whatever
        # part of the order the scenario uses (CIFAR-100-LT's 500 -> 5 over the 100 ids)
        span = len(labels) if cfg.ordering == "label" and labels is not None else n
        factor = cfg.ratio ** (-ranks / max(span - 1, 1))
    else:  # step
        n_minor = int(math.floor(cfg.minority_fraction * n + 0.5))
        factor = torch.where(ranks >= n - n_minor, 1.0 / cfg.ratio, 1.0)
    target = torch.floor(n_max * factor + 1e-9).long()
    return torch.minimum(target, available).clamp_min(1)


def subsample(pos: torch.Tensor, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``pos`` with all but ``keep[c]`` seeded-random images of each class c set to -1."""
    out = pos.clone()
    for c in range(keep.numel()):
        idx = (pos == c).nonzero().flatten()
        drop = idx[torch.randperm(idx.numel(), generator=generator)[int(keep[c]):]]
        out[drop] = -1
    return out


def keep_first(pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``pos`` with only the first ``keep[c]`` images of each class c (in file order) kept: the
    list-file loader of LT-CIL (``base_dataset.get_data``) reads its lines in order and stops
    taking a class once it has its count."""
    out = pos.clone()
    for c in range(keep.numel()):
        out[(pos == c).nonzero().flatten()[int(keep[c]):]] = -1
    return out


def keep_numpy_shuffled(pos: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, seed: int) -> torch.Tensor:
    """``pos`` with the images LT-CIL's CIFAR-100-LT keeps (``IMBALANCECIFAR100.gen_imbalanced_data``
    of Long-Tailed-CIL, after Cao et al.'s LDAM code): ``numpy.random.seed(seed)``, then for every
    class id of the dataset in increasing order, a shuffle of that class's image indices (file
    order), of which the first ``n`` are kept. Classes outside the scenario are shuffled too (they
    draw from the same stream), and dropped."""
    state = np.random.RandomState(seed)
    out = torch.full_like(pos, -1)
    labels_np = labels.numpy()
    for label in np.unique(labels_np):
        idx = np.where(labels_np == label)[0]
        state.shuffle(idx)
        c = int(pos[idx[0]]) if idx.size else -1
        if c >= 0:
            kept = torch.from_numpy(idx[: int(keep[c])])
            out[kept] = c
    return out


@dataclass(frozen=True)
class State:
    """What state ``index`` works on. Class ids here are positions in the class order."""

    index: int
    old: range  # classes seen before this state
    new: range  # classes added by this state
    train: torch.Tensor  # train-set indices of the new classes (hold-out removed)
    val: torch.Tensor  # the balanced hold-out of the new classes (may be empty)
    test: torch.Tensor  # test-set indices of all classes seen so far

    @property
    def seen(self) -> range:
        return range(0, self.new.stop)

    @property
    def n_old(self) -> int:
        return len(self.old)

    @property
    def n_new(self) -> int:
        return len(self.new)

    @property
    def n_seen(self) -> int:
        return self.new.stop


def check_all_classes_learned(initial: int, increment: int, available: int, dataset_name: str) -> None:
    """With ``states`` left to the default, every class of the order must be learned: an
    increment that does not divide the remaining classes would silently leave the last ones out
    (10 classes, initial 2, increment 3: states of 2, 5, 8 classes, classes 8 and 9 never seen)."""
    if initial >= available:
        return
    left = (available - initial) % increment
    if left == 0:
        return
    fits = [k for k in range(1, available - initial + 1) if (available - initial) % k == 0]
    raise UserError(
        f"config key 'scenario.increment': initial {initial} + states of {increment} classes leave the last "
        f"{left} of the {available} classes of '{dataset_name}' unlearned; use an increment of "
        f"{', '.join(map(str, fits))}, or set scenario.states to run fewer states on purpose"
    )


class Scenario:
    """States over a dataset's classes: ``initial`` classes first, then ``increment`` each."""

    def __init__(
        self,
        cfg: ScenarioConfig,
        train_labels: torch.Tensor,
        test_labels: torch.Tensor,
        num_classes: int,
        seed: int,
        dataset_name: str = "dataset",
    ) -> None:
        self.order = class_order(cfg.order, num_classes)
        available = len(self.order)
        max_states = 1 + max(0, (available - cfg.initial) // cfg.increment)
        if cfg.states is None:
            check_all_classes_learned(cfg.initial, cfg.increment, available, dataset_name)
        self.num_states = cfg.states if cfg.states is not None else max_states
        needed = cfg.initial + cfg.increment * (self.num_states - 1)
        if cfg.initial > available or needed > available:
            raise UserError(
                f"config key 'scenario': initial {cfg.initial} + increment {cfg.increment} x "
                f"{self.num_states - 1} more states = {needed} classes, but '{dataset_name}' "
                f"has {available} classes in the order"
            )
        self.ends = [cfg.initial + cfg.increment * b for b in range(self.num_states)]
        self.position_of = torch.full((num_classes,), -1, dtype=torch.int64)
        self.position_of[torch.tensor(self.order[:needed])] = torch.arange(needed)
        self.train_pos = self.position_of[train_labels]
        self.test_pos = self.position_of[test_labels]
        self.imbalance = self._apply_imbalance(cfg.imbalance, seed, train_labels)
        self.val_mask = self._holdout(cfg.val_per_class, seed)
        self._position_on: dict[torch.device, torch.Tensor] = {}

    def positions_on(self, device: torch.device) -> torch.Tensor:
        """``position_of`` on ``device``, copied there once (not once per training batch)."""
        if device not in self._position_on:
            self._position_on[device] = self.position_of.to(device)
        return self._position_on[device]

    def _apply_imbalance(self, cfg: ImbalanceConfig, run_seed: int, train_labels: torch.Tensor) -> dict[str, Any]:
        """Drop images to the per-class profile (which ones: ``cfg.keep``); returns what was
        applied, with the kept counts per class position (train, and test) for results.json. The
        hold-out of ``val_per_class`` is taken afterwards, from the kept images."""
        seed = run_seed if cfg.seed is None else cfg.seed
        n = self.ends[-1]
        available = class_counts(self.train_pos, n)
        keep = imbalance_counts(cfg, available, seed, self.order)
        if cfg.profile != "none" and cfg.keep == "numpy_shuffle":
            self.train_pos = keep_numpy_shuffled(self.train_pos, train_labels.cpu(), keep, seed)
        elif cfg.profile != "none" and cfg.keep == "first":
            self.train_pos = keep_first(self.train_pos, keep)
        elif cfg.profile != "none":
            self.train_pos = subsample(self.train_pos, keep, seeded_generator(seed, "imbalance-train"))
        if cfg.profile != "none" and cfg.apply_to_test:
            # each class keeps the same fraction of its test images as of its training images
            test_avail = class_counts(self.test_pos, n)
            test_keep = torch.floor(test_avail.double() * keep / available.clamp_min(1) + 0.5).long()
            self.test_pos = subsample(self.test_pos, test_keep.clamp(1), seeded_generator(seed, "imbalance-test"))
        record = cfg.model_dump(mode="json")
        record["train_per_class"] = class_counts(self.train_pos, n).tolist()  # by class position
        record["test_per_class"] = class_counts(self.test_pos, n).tolist()
        return record

    def _holdout(self, per_class: int, seed: int) -> torch.Tensor:
        """Mark ``per_class`` training images of every class as validation (seeded choice)."""
        mask = torch.zeros_like(self.train_pos, dtype=torch.bool)
        if per_class == 0:
            return mask
        gen = seeded_generator(seed, "validation")
        for c in range(self.ends[-1]):
            idx = (self.train_pos == c).nonzero().flatten()
            if idx.numel() <= per_class:
                raise UserError(
                    f"config key 'scenario.val_per_class': class {self.order[c]} has only "
                    f"{idx.numel()} training images, cannot hold out {per_class}"
                )
            mask[idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]] = True
        return mask

    def state_range(self, b: int) -> range:
        return range(self.ends[b - 1] if b > 0 else 0, self.ends[b])

    def state(self, b: int) -> State:
        if not 0 <= b < self.num_states:
            raise IndexError(f"state {b} outside 0..{self.num_states - 1}")
        new = self.state_range(b)
        in_new = (self.train_pos >= new.start) & (self.train_pos < new.stop)
        return State(
            index=b,
            old=range(0, new.start),
            new=new,
            train=(in_new & ~self.val_mask).nonzero().flatten(),
            val=(in_new & self.val_mask).nonzero().flatten(),
            test=((self.test_pos >= 0) & (self.test_pos < new.stop)).nonzero().flatten(),
        )

    def val_indices(self, n_seen: int) -> torch.Tensor:
        """The held-out validation images (``val_per_class``) of the first ``n_seen`` class
        positions: never trained on, never in the memory."""
        return (self.val_mask & (self.train_pos >= 0) & (self.train_pos < n_seen)).nonzero().flatten()

    def train_indices_of(self, classes: range) -> torch.Tensor:
        """All non-held-out training indices of the given class positions (joint training)."""
        mask = (self.train_pos >= classes.start) & (self.train_pos < classes.stop) & ~self.val_mask
        return mask.nonzero().flatten()
