"""Class order, states, and the per-state train / validation / test indices.

A scenario only splits: it maps each original class id to its *position* in the class order,
so that state b owns a contiguous range of positions, and hands out index tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cilkit.config import ScenarioConfig
from cilkit.errors import UserError


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
        self.val_mask = self._holdout(cfg.val_per_class, seed)

    def _holdout(self, per_class: int, seed: int) -> torch.Tensor:
        """Mark ``per_class`` training images of every class as validation (seeded choice)."""
        mask = torch.zeros_like(self.train_pos, dtype=torch.bool)
        if per_class == 0:
            return mask
        gen = torch.Generator().manual_seed(seed * 7919 + 17)
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

    def state_of_class(self, position: int) -> int:
        return next(b for b, end in enumerate(self.ends) if position < end)

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

    def train_indices_of(self, classes: range) -> torch.Tensor:
        """All non-held-out training indices of the given class positions (joint training)."""
        mask = (self.train_pos >= classes.start) & (self.train_pos < classes.stop) & ~self.val_mask
        return mask.nonzero().flatten()
