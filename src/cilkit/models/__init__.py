"""Backbones, growable heads, the model builder and the loader of pretrained backbone weights.

Here live the registered backbones (``backbones``: the ResNets and :func:`build_backbone`;
``small``: ``convnet`` and ``lenet``), DER's :class:`GrowingBackbone` (``growing``), the heads
and :class:`IncrementalNet` (``heads``) and BiC's :class:`BiasLayer` (``bias``). Importing the
package imports every backbone module, so their ``@register_backbone`` decorators run.

The package may import only the top-level modules (``errors``, ``registry``, ``io``, ...); never
``data``, ``methods``, ``run`` or ``analysis``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import nn

from cilkit.common import io
from cilkit.common.errors import UserError, described
from cilkit.models.backbones import build_backbone
from cilkit.models import small  # noqa: F401  (registers convnet and lenet)
from cilkit.models.growing import GrowingBackbone
from cilkit.settings.registry import BACKBONE_DESCRIPTIONS, BACKBONES
from cilkit.models.bias import BiasLayer
from cilkit.models.heads import IncrementalLinear, IncrementalNet, SplitCosineLinear

__all__ = [
    "BACKBONES",
    "BACKBONE_DESCRIPTIONS",
    "BiasLayer",
    "GrowingBackbone",
    "IncrementalLinear",
    "IncrementalNet",
    "SplitCosineLinear",
    "build_backbone",
    "build_model",
    "load_backbone_weights",
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


def load_backbone_weights(backbone: nn.Module, path: str, key: str = "model.weights") -> None:
    """Load the state dict saved in ``path`` (``torch.save(backbone.state_dict(), path)``, read
    with ``weights_only=True``) into ``backbone``. A missing or unreadable file, or a state dict
    that does not fit (a key missing or extra, a shape that differs), is one ``UserError`` line
    naming ``key``, the file and the first mismatching key."""
    where = f"config key '{key}': '{path}'"
    if not os.path.isfile(path):
        raise UserError(f"{where}: file not found")
    try:
        state = io.load_torch(path)
    except Exception as e:  # truncated, garbage, or a pickle that needs code to load
        raise UserError(f"{where} cannot be read as a state dict ({described(e, 160)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where} does not hold a state dict (a dict of tensors), found {type(state).__name__}")
    mismatch = _first_mismatch(backbone.state_dict(), state)
    if mismatch is not None:
        raise UserError(f"{where} does not fit backbone {type(backbone).__name__}: {mismatch}")
    backbone.load_state_dict(state)


def _first_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str | None:
    """The first key (in the backbone's order, then the file's) missing, extra or of another
    shape, with both shapes; None when ``given`` fits."""
    for k, v in expected.items():
        if k not in given:
            return f"key '{k}' {list(v.shape)} is missing from the file"
        if given[k].shape != v.shape:
            return f"key '{k}' has shape {list(given[k].shape)} in the file but {list(v.shape)} in the backbone"
    extra = [k for k in given if k not in expected]
    return f"the file has key '{extra[0]}' {list(given[extra[0]].shape)}, which the backbone lacks" if extra else None
