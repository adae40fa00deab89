"""A test-only method that owns a grown shape: from state 2 on a second backbone branch (the
first frozen, DER-style) and an auxiliary head over the new branch's features (the state's new
classes plus one "old" class), trained with its own loss term. It lives in tests, not in the
package; tests/conftest.py registers it, so every test parametrised over the registry covers it
(run, pure queries, resume after any state) and tests/test_model_shape.py checks that a resume
after state 2 rebuilds the branch and the head before the weights load."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cilkit.methods.base import Batch, Context, LossTerms, Method, MethodConfig
from cilkit.models import GrowingBackbone, IncrementalLinear, IncrementalNet, build_backbone
from cilkit.settings.options import option
from cilkit.settings.registry import register_method


class GrowConfig(MethodConfig):
    aux_weight: float = option(0.5, ge=0.0, help="weight of the auxiliary head's cross-entropy", state0=False)


@register_method("grow_test")
class GrowTest(Method):
    description = "test only: a second backbone branch and an auxiliary head from state 2 on"
    Config = GrowConfig
    cfg: GrowConfig

    def build_model(self, in_channels: int, image_size: int) -> IncrementalNet:
        m = self.run_config.model

        def branch() -> torch.nn.Module:
            return build_backbone(m.backbone, in_channels=in_channels, image_size=image_size, width=m.width)

        backbone = GrowingBackbone(branch)
        return IncrementalNet(backbone, IncrementalLinear(backbone.out_dim))

    def before_state(self, ctx: Context) -> None:
        if ctx.state.index == 1:
            ctx.model.grow_backbone()  # the first branch frozen, the head widened
        super().before_state(ctx)
        if ctx.state.index >= 1:
            ctx.model.set_aux_head("aux", ctx.state.n_new + 1, source="branch")

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        terms = {"ce": F.cross_entropy(out["logits"], batch.y)}
        if "aux" in out:
            n_old = ctx.state.n_old
            target = torch.where(batch.y < n_old, torch.zeros_like(batch.y), batch.y - n_old + 1)
            terms["aux"] = self.cfg.aux_weight * F.cross_entropy(out["aux"]["aux"], target)
        return terms
