"""A plugin method: fine-tuning with memory, trained with label smoothing (Szegedy et al., CVPR
2016, sec. 7): the target puts 1 - s on the true class and spreads s over all classes, which
softens the over-confident new-class scores fine-tuning is known for.

    cilkit run --plugin examples/my_method.py --set method=smooth_finetune --set smooth_finetune.smoothing=0.2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from cilkit.methods.base import Batch, Context, Method, MethodConfig
from cilkit.registry import register_method


class SmoothConfig(MethodConfig):
    smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # s: the target mass spread over all classes


@register_method("smooth_finetune")
class SmoothFinetune(Method):
    description = "fine-tuning with memory and label smoothing (plugin example)"
    Config = SmoothConfig
    cfg: SmoothConfig

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(out["logits"], batch.y, label_smoothing=self.cfg.smoothing)
