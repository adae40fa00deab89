"""A plugin method: fine-tuning with memory, trained with label smoothing (Szegedy et al., CVPR
2016, sec. 7): the target puts 1 - s on the true class and spreads s over all classes, which
softens the over-confident new-class scores fine-tuning is known for.

The whole method is this file: the engine trains with its loss (named terms, summed; each
term's epoch mean lands in history.jsonl), and the test suite covers it without any other file
(tests/conftest.py loads every example that registers a method).

    cilkit run --plugin examples/my_method.py --set method=smooth_finetune --set smooth_finetune.smoothing=0.2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cilkit.methods.base import Batch, Context, LossTerms, Method, MethodConfig
from cilkit.settings.options import option
from cilkit.settings.registry import register_method


class SmoothConfig(MethodConfig):
    smoothing: float = option(0.1, ge=0.0, lt=1.0, help="s: the target mass spread over all classes")


@register_method("smooth_finetune")
class SmoothFinetune(Method):
    description = "fine-tuning with memory and label smoothing (plugin example)"
    Config = SmoothConfig
    cfg: SmoothConfig

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        return {"smoothed_ce": F.cross_entropy(out["logits"], batch.y, label_smoothing=self.cfg.smoothing)}
