"""The small backbones for tiny images: :class:`ConvNet` (``convnet``) and :class:`LeNet` (``lenet``).

Both are registered with ``@register_backbone`` when this module is imported (``cilkit.models``
imports it), follow the conventions of :mod:`cilkit.models.backbones` (``out_dim``,
``last_relu``, the ``stage_outputs`` / ``embed`` seam, Kaiming initialisation) and share its
``_conv3x3`` and ``_init_weights`` helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.models.backbones import StagedBackbone, _conv3x3, _init_weights
from cilkit.settings.registry import register_backbone


def _conv_bn_relu(
    in_ch: int, out_ch: int, relu: bool = True, stride: int = 1
) -> list[nn.Module]:
    layers: list[nn.Module] = [_conv3x3(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class ConvNet(StagedBackbone):
    """Small fast convnet for 8x8 (digits) and 28x28 (MNIST-like) inputs.

    conv3x3(w)-BN-ReLU, conv3x3(w)-BN-ReLU, maxpool 2, conv3x3(2w)-BN-ReLU,
    conv3x3(2w)-BN-ReLU, global average pool -> 2w features (a VGG-style plain net,
    Simonyan & Zisserman 2015, scaled down). For inputs of at least 16 px
    (``image_size >= 16``) the first conv has stride 2, an extra downsampling stage that
    halves the resolution before the costly layers: it matches conv + max-pool in accuracy
    on Fashion-MNIST class pairs and is about twice as fast on CPU (max-pool with indices
    and BN at full 28x28 resolution dominate the cost otherwise).
    With ``last_relu=False`` the final ReLU before pooling is dropped.

    Stages (``stage_outputs(x)``), split at the max-pool as a ResNet stage starts with its
    downsampling: stage 1 is the two ``w``-channel conv blocks (output ``(N, w, H/s, W/s)``,
    ``s`` the first conv's stride), stage 2 is max-pool and the two ``2w``-channel conv blocks
    (output ``(N, 2w, H/2s, W/2s)``, rounded down). ``embed(last)`` is global average pooling.
    The layers stay one ``nn.Sequential`` ``body`` (state-dict keys ``body.<i>...``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        last_relu: bool = True,
        image_size: int = 28,
        width: int = 32,
    ) -> None:
        super().__init__()
        stride = 2 if image_size >= 16 else 1
        layers = _conv_bn_relu(in_channels, width, stride=stride)
        layers += _conv_bn_relu(width, width)
        self._pool_index = len(layers)  # body[_pool_index] (the max-pool) starts stage 2
        layers.append(nn.MaxPool2d(2))
        layers += _conv_bn_relu(width, 2 * width)
        layers += _conv_bn_relu(2 * width, 2 * width, relu=last_relu)
        self.body = nn.Sequential(*layers)
        self.out_dim = 2 * width
        _init_weights(self)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of each of the two stages, in order (see the class docstring)."""
        maps = []
        for i, layer in enumerate(self.body):
            if i == self._pool_index:
                maps.append(x)
            x = layer(x)
        maps.append(x)
        return maps


@register_backbone("convnet", "small fast 4-conv net for 8x8/28x28 inputs, 2*width-d features (default 64)")
def convnet(
    in_channels: int = 1,
    last_relu: bool = True,
    image_size: int = 28,
    width: int = 32,
) -> ConvNet:
    """Small convnet for tiny images (see ``ConvNet``)."""
    return ConvNet(in_channels, last_relu, image_size, width)


class LeNet(StagedBackbone):
    """LeNet-5-like net (LeCun et al., Proc. IEEE 1998, Fig. 2), with ReLU and max-pooling.

    conv 6@5x5 (padding 2) - ReLU - max-pool 2 - conv 16@5x5 - ReLU - max-pool 2 - fc 120 - ReLU -
    fc 84 - ReLU -> 84-d features (the classifier is the head). LeNet-5 read 28x28 digits centred
    in a 32x32 field; the padding of 2 on the first conv does the same, so a 28x28 input gives the
    original 16x5x5 map before the first fc layer.

    Other sizes (documented adaptation): inputs smaller than 28 px are zero-padded (centred, in
    the normalised space, i.e. with the mean pixel) to 28x28; larger inputs are reduced by an
    adaptive average pooling of the last 16-channel map to 5x5, so the fc layers keep LeNet's
    400 -> 120 -> 84 shape for any size. Any channel count works (the first conv takes
    ``in_channels``). With ``last_relu=False`` the ReLU after fc 84 is dropped. Weights: conv as
    the other backbones (Kaiming normal, fan_out), linear layers PyTorch's default.

    Stages (``stage_outputs(x)``): the two conv blocks, each conv - ReLU - max-pool 2 (the zero-padding
    of small inputs comes first, in stage 1): ``(N, 6, 14, 14)`` and ``(N, 16, 5, 5)`` for a
    28x28 (or smaller) input. ``embed(last)`` is the rest of the net: the adaptive pooling to
    5x5 where the map is larger, flatten, fc 120 - ReLU - fc 84 (- ReLU).
    """

    min_size = 28

    def __init__(self, in_channels: int = 1, last_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.last_relu = last_relu
        self.out_dim = 84
        _init_weights(self)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of each of the two conv blocks, in order (see the class docstring)."""
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            dh, dw = max(0, self.min_size - h), max(0, self.min_size - w)
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        first = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return [first, F.max_pool2d(F.relu(self.conv2(first)), 2)]

    def embed(self, last: torch.Tensor) -> torch.Tensor:
        """Features ``(N, 84)`` from the last stage map: (pool to 5x5,) fc 120, fc 84."""
        x = last
        if x.shape[-2:] != (5, 5):
            x = F.adaptive_avg_pool2d(x, 5)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = self.fc2(x)
        return F.relu(x) if self.last_relu else x



@register_backbone("lenet", "LeNet-5-like: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84 -> 84-d, 61k params")
def lenet(in_channels: int = 1, last_relu: bool = True) -> LeNet:
    """LeNet-5-like net for small images (see ``LeNet``)."""
    return LeNet(in_channels, last_relu)
