"""Feature extractors (backbones) for class-incremental learning.

Every backbone is an ``nn.Module`` whose ``forward(x)`` returns pooled features of shape
``(N, out_dim)`` and which exposes the int attribute ``out_dim``. Every factory is registered
with ``@register_backbone`` (:mod:`cilkit.settings.registry`, where a plugin registers its own) and
takes ``in_channels`` (and ``image_size`` / ``width`` / ``last_relu`` when it uses them).
LUCIR (Hou et al., CVPR 2019, section 3.2) removes the ReLU after the last residual block so
that the cosine classifier sees features that can be negative. With ``last_relu=False`` the last block returns ``bn(conv(...)) + shortcut``
without the final ReLU (for the convnet, the last activation before pooling is dropped).

Weights are initialised with Kaiming normal (fan_out, relu) for convolutions and
weight 1 / bias 0 for batch norm (He et al., ICCV 2015; as in He et al., CVPR 2016). All
randomness comes from the global torch RNG at construction, so callers seed it.

Stage seam (for methods that distil intermediate feature maps, e.g. PODNet): every built-in
backbone also has ``stage_outputs(x) -> list[Tensor]``, the output map ``(N, C_s, H_s, W_s)`` of each
stage in order, and ``embed(last) -> Tensor``, which turns the last of those maps into the
``(N, out_dim)`` features. ``forward(x)`` is defined as ``embed(stage_outputs(x)[-1])``, so the two
paths are one computation. What a stage is, per backbone, is in its class docstring. A plugin
backbone may implement the pair too (:meth:`cilkit.models.IncrementalNet.forward` with
``stages=True`` needs both); one without them still works everywhere else.
:class:`~cilkit.models.growing.GrowingBackbone` holds one backbone per state (DER) and
concatenates their features; the small networks for tiny images (``convnet``, ``lenet``) are in
:mod:`cilkit.models.small`.
"""

from __future__ import annotations

import abc

import inspect
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.common.errors import UserError, unknown_name
from cilkit.settings.registry import (
    BACKBONE_OPTIONAL_ARGS,
    BACKBONES,
    call_plugin,
    register_backbone,
)

ShortcutKind = Literal["conv", "pad"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(module: nn.Module) -> None:
    """Kaiming normal (fan_out, relu) for convs; BN weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PadShortcut(nn.Module):
    """Parameter-free shortcut ("option A", He et al. 2016, section 3.3).

    Subsamples spatially by ``stride`` and zero-pads the extra channels.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def _shortcut(in_ch: int, out_ch: int, stride: int, kind: ShortcutKind) -> nn.Module:
    """Identity if shapes match, else option B (1x1 conv + BN) or option A (pad)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(in_ch, out_ch, stride)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (He et al. 2016, Fig. 2 left).

    With ``last_relu=False`` the block returns ``bn2(conv2(...)) + shortcut`` without the
    final ReLU (LUCIR).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        shortcut: ShortcutKind = "conv",
        last_relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, shortcut)
        self.last_relu = last_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.last_relu else out


def _make_stage(
    in_ch: int,
    out_ch: int,
    blocks: int,
    stride: int,
    shortcut: ShortcutKind = "conv",
    last_relu: bool = True,
) -> nn.Sequential:
    """A stage of ``blocks`` basic blocks; only the first strides, only the last may skip ReLU."""
    layers = []
    for i in range(blocks):
        layers.append(
            BasicBlock(
                in_ch if i == 0 else out_ch,
                out_ch,
                stride if i == 0 else 1,
                shortcut,
                last_relu=last_relu or i < blocks - 1,
            )
        )
    return nn.Sequential(*layers)


class StagedBackbone(nn.Module, abc.ABC):
    """A backbone made of stages (the stage seam): ``stage_outputs(x)`` gives each stage's map,
    ``embed(last)`` the features from the last one (default: global average pooling), and
    ``forward`` is the two in a row."""

    @abc.abstractmethod
    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output map, first to last (what every staged backbone defines)."""

    def embed(self, last: torch.Tensor) -> torch.Tensor:
        """Features ``(N, out_dim)`` from the last stage map: global average pooling."""
        return torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.stage_outputs(x)[-1])


class ResNet(StagedBackbone):
    """A stem, a list of basic-block stages, and global average pooling.

    Stage outputs (``stage_outputs(x)``): the output of each residual stage (the submodules
    ``stages``), after its last block (and its last ReLU unless ``last_relu=False`` removes it),
    before pooling; the stem is not a stage. ``embed(last)`` is global average pooling.
    """

    def __init__(self, stem: nn.Module, stages: list[nn.Sequential], out_dim: int) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.out_dim = out_dim
        _init_weights(self)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of every residual stage, ``(N, C_s, H_s, W_s)``, in order."""
        maps = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


def _resnet_stages(
    widths: list[int],
    blocks: int,
    in_ch: int,
    shortcut: ShortcutKind,
    last_relu: bool,
) -> list[nn.Sequential]:
    """Stages with the given widths; the first stage has stride 1, the others stride 2."""
    stages = []
    for i, w in enumerate(widths):
        is_last = i == len(widths) - 1
        stages.append(
            _make_stage(in_ch, w, blocks, 1 if i == 0 else 2, shortcut, last_relu or not is_last)
        )
        in_ch = w
    return stages


@register_backbone("resnet32", "CIFAR ResNet-32 (He et al. 2016, sec. 4.2), 0.47M params, 64-d features")
def resnet32(
    in_channels: int = 3,
    last_relu: bool = True,
    shortcut: ShortcutKind = "conv",
) -> ResNet:
    """CIFAR ResNet-32 (He et al., CVPR 2016, section 4.2), 6n+2 layers with n=5.

    3x3 conv with 16 channels, three stages of 5 basic blocks with 16/32/64 channels
    (stride 2 at stages 2 and 3), global average pooling -> 64-d features.

    Shortcut when the shape changes: ``shortcut='conv'`` (default) is option B, a 1x1
    stride-2 conv + BN (~0.47M parameters); ``shortcut='pad'`` is option A, stride-2
    subsampling with zero-padded channels (~0.46M parameters), as used by some iCaRL/LUCIR
    code bases.
    """
    if shortcut not in ("conv", "pad"):
        raise ValueError(f"shortcut must be 'conv' or 'pad', got {shortcut!r}")
    stem = nn.Sequential(_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    stages = _resnet_stages([16, 32, 64], 5, 16, shortcut, last_relu)
    return ResNet(stem, stages, out_dim=64)


@register_backbone("resnet18", "ImageNet ResNet-18 (7x7 stem + max-pool), 11.2M params, 512-d features")
def resnet18(in_channels: int = 3, last_relu: bool = True) -> ResNet:
    """ImageNet ResNet-18 (He et al., CVPR 2016, Table 1) without the fc layer -> 512-d.

    7x7 stride-2 conv (64), BN, ReLU, 3x3 stride-2 max-pool, four stages of 2 basic blocks
    with 64/128/256/512 channels, 1x1 conv + BN downsampling shortcuts (option B).
    """
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    stages = _resnet_stages([64, 128, 256, 512], 2, 64, "conv", last_relu)
    return ResNet(stem, stages, out_dim=512)


@register_backbone("resnet18_cifar", "ResNet-18 with a 3x3 stride-1 stem and no max-pool for 32x32 inputs, 512-d")
def resnet18_cifar(in_channels: int = 3, last_relu: bool = True) -> ResNet:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, otherwise as ``resnet18``.

    This is the common CIFAR adaptation of ResNet-18 (e.g. used by PODNet/DER code bases).
    """
    stem = nn.Sequential(_conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
    stages = _resnet_stages([64, 128, 256, 512], 2, 64, "conv", last_relu)
    return ResNet(stem, stages, out_dim=512)


def build_backbone(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    width: int = 32,
    last_relu: bool = True,
) -> nn.Module:
    """Build the backbone registered under ``name`` (:func:`cilkit.settings.registry.register_backbone`):
    its factory gets ``in_channels``, and ``image_size``, ``width`` and ``last_relu`` when it
    names them; ``last_relu=False`` asked of a factory without that argument is a ``UserError``
    (the method needs features that can be negative). Raises ``UserError`` for an unknown name
    or a module without ``out_dim``."""
    if name not in BACKBONES:
        raise UserError(f"config key 'model.backbone': {unknown_name('backbone', name, BACKBONES, plugin=True)}")
    factory = BACKBONES[name]
    params = inspect.signature(factory).parameters
    if not last_relu and "last_relu" not in params:
        raise UserError(f"config key 'model.backbone': backbone '{name}' cannot drop its last ReLU (its factory "
                        "takes no last_relu), which this method's classifier needs: choose another backbone")
    optional = dict(zip(BACKBONE_OPTIONAL_ARGS, (image_size, width, last_relu)))
    net = call_plugin(factory, f"config key 'model.backbone': backbone '{name}'", in_channels=in_channels,
                      **{k: v for k, v in optional.items() if k in params})
    if not isinstance(net, nn.Module) or not isinstance(getattr(net, "out_dim", None), int):
        raise UserError(f"config key 'model.backbone': backbone '{name}' did not return an nn.Module "
                        "with an int attribute out_dim")
    return net
