"""The growing backbone of DER (Yan et al., CVPR 2021): :class:`GrowingBackbone`.

It holds one backbone per state, built by a factory, and concatenates their features, oldest
first; ``grow()`` appends a backbone and by default freezes the ones held before. It has no
name in the backbone registry: it is built around a factory of any backbone, and
:meth:`cilkit.models.IncrementalNet.grow_backbone` grows it and widens the head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import torch
from torch import nn


class GrowingBackbone(nn.Module):
    """One backbone per state, their features concatenated (DER: Yan et al., CVPR 2021).

    ``factory()`` builds a backbone (an ``nn.Module`` with an int ``out_dim``); the first is
    built at construction and ``grow()`` appends another. ``forward(x)`` is
    ``torch.cat([b(x) for b in backbones], 1)``, oldest first, so ``out_dim`` is the sum of
    theirs and the columns of an earlier backbone keep their place after a grow. By default
    ``grow`` freezes every backbone it already holds: ``requires_grad`` False, and kept in
    eval mode by ``train()`` (their BN statistics stay fixed). The new backbone follows this
    module's mode. Parameters of a new backbone are new objects: rebuild optimisers after
    ``grow`` (:meth:`cilkit.models.IncrementalNet.grow_backbone` also widens the head). To
    start a new backbone from the previous one's weights (as PyCIL's DER does), load them in
    the factory or after ``grow``. Which backbones are frozen is not in the state dict: to
    resume, build the container, ``grow`` as often as the checkpoint's state did, then load
    it (:meth:`cilkit.models.IncrementalNet.rebuild` does, from the checkpoint's architecture).
    There is no ``stages`` seam on this container.
    """

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.factory = factory
        self.backbones = nn.ModuleList([self._build()])
        self.num_frozen = 0  # the first num_frozen backbones are frozen

    def _build(self) -> nn.Module:
        net = self.factory()
        if not isinstance(net, nn.Module) or not isinstance(getattr(net, "out_dim", None), int):
            raise TypeError(f"GrowingBackbone: the factory returned {type(net).__name__}, "
                            "not an nn.Module with an int attribute out_dim")
        return net

    @property
    def out_dim(self) -> int:
        """Width of the concatenated features: the sum of the backbones' ``out_dim``."""
        return sum(int(getattr(b, "out_dim")) for b in self.backbones)

    def grow(self, freeze_old: bool = True) -> nn.Module:
        """Append a backbone from the factory (moved to the device of the ones held) and return
        it; with ``freeze_old`` (default), freeze every backbone held before."""
        net = self._build()
        held = next(self.backbones.parameters(), None)
        if held is not None:
            net.to(held.device)  # the factory builds on the CPU; follow a model moved to a GPU
        if freeze_old:
            self.freeze_first(len(self.backbones))
        net.train(self.training)
        self.backbones.append(net)
        return net

    def freeze_first(self, k: int) -> None:
        """Freeze the first ``k`` backbones (``requires_grad`` False, kept in eval mode)."""
        for old in list(self.backbones)[:k]:
            old.requires_grad_(False)
            old.eval()
        self.num_frozen = max(self.num_frozen, k)

    def train(self, mode: bool = True) -> Self:
        """Set the mode of this module and its unfrozen backbones; frozen ones stay in eval."""
        super().train(mode)
        for frozen in list(self.backbones)[: self.num_frozen]:
            frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.backbones], 1)
