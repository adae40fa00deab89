"""The growing backbones: DER's :class:`GrowingBackbone` (Yan et al., CVPR 2021) and MEMO's
:class:`SharedPrefixGrowingBackbone` (Zhou et al., ICLR 2023).

:class:`GrowingBackbone` holds one backbone per state, built by a factory, and concatenates
their features, oldest first; ``grow()`` appends a backbone and by default freezes the ones held
before. :class:`SharedPrefixGrowingBackbone` is one too, except that the first stages of a staged
backbone (the stem and ``shared_stages`` stages) are one shared module and only the rest, the
specialised block, is replicated per state. Neither has a name in the backbone registry: they
are built around a factory of a backbone, and :meth:`cilkit.models.IncrementalNet.grow_backbone`
grows either and widens the head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.models.backbones import ResNet
from cilkit.models.small import ConvNet


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


def stage_split(net: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """``(stem, stages)`` of a built-in backbone whose features are the global average pooling
    of its last stage map: a ``ResNet`` (its ``stem`` and ``stages``) or the ``convnet`` (its two
    stages, split at the max-pool as its ``stage_outputs`` does; no stem). The modules are the
    backbone's own (not copies). None for any other backbone (``lenet``'s features come from fc
    layers; a plugin's structure is unknown)."""
    if isinstance(net, ResNet):
        return net.stem, list(net.stages)
    if isinstance(net, ConvNet):
        pool = net._pool_index  # the convnet's own stage boundary
        return nn.Identity(), [net.body[:pool], net.body[pool:]]
    return None


class SpecialisedBlock(nn.Module):
    """MEMO's specialised block (PyCIL's ``AdaptiveExtractor``): the last stages of a staged
    backbone, then global average pooling to ``out_dim`` features."""

    def __init__(self, stages: list[nn.Module], out_dim: int) -> None:
        super().__init__()
        self.stages = nn.Sequential(*stages)
        self.out_dim = out_dim

    def forward(self, shared_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(shared_map), 1), 1)


class SharedPrefixGrowingBackbone(GrowingBackbone):
    """A growing backbone whose first stages are shared (MEMO: Zhou et al., ICLR 2023; PyCIL's
    ``AdaptiveNet``).

    ``factory()`` builds a staged backbone that :func:`stage_split` knows (a ``ResNet`` or the
    ``convnet``); it is called once. Its stem and first ``shared_stages`` stages become
    ``shared`` (PyCIL's ``TaskAgnosticExtractor``, the generalised blocks), the remaining stages
    the first :class:`SpecialisedBlock` (``backbones[0]``, PyCIL's ``AdaptiveExtractors[0]``).
    ``forward(x)`` runs ``shared`` once and concatenates every block's features of its map, oldest
    first: with one block it is the factory's backbone, number for number.

    ``grow()`` appends a copy of the newest block (PyCIL's ``update_fc`` loads the previous
    block's state dict into the new one), trainable and in this module's mode, and by default
    freezes the blocks held before (as :class:`GrowingBackbone`: ``requires_grad`` False, kept
    in eval mode). ``freeze_shared()`` freezes ``shared`` the same way (MEMO after its first
    state). The count of frozen blocks and whether ``shared`` is frozen are not in the state
    dict: :meth:`cilkit.models.IncrementalNet.architecture` records them and ``rebuild``
    restores them.
    """

    def __init__(self, factory: Callable[[], nn.Module], shared_stages: int) -> None:
        nn.Module.__init__(self)
        net = factory()
        split = stage_split(net)
        if split is None:
            raise TypeError(f"SharedPrefixGrowingBackbone: backbone {type(net).__name__} has no known stem and "
                            "stages (a ResNet or the convnet)")
        stem, stages = split
        if not 0 <= shared_stages < len(stages):
            raise ValueError(f"shared_stages must be in 0..{len(stages) - 1} (the backbone has {len(stages)} "
                             f"stages and at least one is specialised), got {shared_stages}")
        self.factory = factory
        self.shared_stages = shared_stages
        self.shared = nn.Sequential(stem, *stages[:shared_stages])
        self.backbones = nn.ModuleList([SpecialisedBlock(stages[shared_stages:], int(getattr(net, "out_dim")))])
        self.num_frozen = 0
        self.shared_frozen = False

    def _build(self) -> nn.Module:
        """A copy of the newest block, trainable (the previous one's weights, as PyCIL)."""
        block = copy.deepcopy(self.backbones[-1])
        block.requires_grad_(True)
        return block

    def freeze_shared(self) -> None:
        """Freeze the shared stages (``requires_grad`` False, kept in eval mode)."""
        self.shared.requires_grad_(False)
        self.shared.eval()
        self.shared_frozen = True

    def train(self, mode: bool = True) -> Self:
        """As :meth:`GrowingBackbone.train`; a frozen ``shared`` stays in eval too."""
        super().train(mode)
        if self.shared_frozen:
            self.shared.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared_map = self.shared(x)
        return torch.cat([b(shared_map) for b in self.backbones], 1)
