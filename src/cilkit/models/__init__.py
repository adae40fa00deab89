"""Backbones, growable heads and the model builder."""

from __future__ import annotations

from cilkit.models.backbones import BACKBONE_DESCRIPTIONS, BACKBONES, build_backbone
from cilkit.models.heads import IncrementalLinear, IncrementalNet

__all__ = [
    "BACKBONES",
    "BACKBONE_DESCRIPTIONS",
    "IncrementalLinear",
    "IncrementalNet",
    "build_backbone",
    "build_model",
]


def build_model(
    backbone: str,
    *,
    in_channels: int,
    image_size: int,
    width: int = 32,
    last_relu: bool = True,
) -> IncrementalNet:
    """Backbone ``backbone`` plus an ``IncrementalLinear`` head with 0 classes."""
    net = build_backbone(
        backbone, in_channels=in_channels, image_size=image_size, width=width, last_relu=last_relu
    )
    return IncrementalNet(net, IncrementalLinear(net.out_dim))
