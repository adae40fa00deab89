"""Backbones, growable heads and the model builder."""

from __future__ import annotations

from typing import Literal

from cilkit.models.backbones import BACKBONE_DESCRIPTIONS, BACKBONES, build_backbone
from cilkit.models.bias import BiasLayer
from cilkit.models.heads import IncrementalLinear, IncrementalNet, SplitCosineLinear

__all__ = [
    "BACKBONES",
    "BACKBONE_DESCRIPTIONS",
    "BiasLayer",
    "IncrementalLinear",
    "IncrementalNet",
    "SplitCosineLinear",
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
    head: Literal["linear", "cosine"] = "linear",
) -> IncrementalNet:
    """Backbone ``backbone`` plus a head with 0 classes: ``IncrementalLinear`` (``"linear"``)
    or LUCIR's ``SplitCosineLinear`` (``"cosine"``)."""
    heads: dict[str, type[IncrementalLinear] | type[SplitCosineLinear]] = {"linear": IncrementalLinear, "cosine": SplitCosineLinear}
    if head not in heads:
        raise ValueError(f"unknown head '{head}' ({' or '.join(heads)})")
    net = build_backbone(
        backbone, in_channels=in_channels, image_size=image_size, width=width, last_relu=last_relu
    )
    return IncrementalNet(net, heads[head](int(getattr(net, "out_dim"))))
