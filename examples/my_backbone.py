"""A plugin backbone: a two-layer perceptron on the flattened image.

    cilkit run --plugin examples/my_backbone.py --set model.backbone=mlp --set model.width=64

A factory takes ``in_channels`` and ``last_relu`` (and ``image_size`` / ``width`` if it names
them) and returns a module mapping (N, C, H, W) images to (N, out_dim) features.
"""

from __future__ import annotations

import torch
from torch import nn

from cilkit.settings.registry import register_backbone


class MLP(nn.Module):
    """flatten -> linear(2 * width) -> ReLU -> linear(width) [-> ReLU unless last_relu=False]."""

    def __init__(self, in_features: int, width: int, last_relu: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)]
        self.body = nn.Sequential(*layers, *([nn.ReLU()] if last_relu else []))
        self.out_dim = width  # the head reads the feature size here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register_backbone("mlp", "two-layer perceptron on the flattened image, width-d features (plugin example)")
def mlp(in_channels: int, last_relu: bool, image_size: int, width: int) -> MLP:
    return MLP(in_channels * image_size * image_size, width, last_relu)
