"""Fine-tuning with memory (FT): the baseline of IL2M and of active IL.

At each state the previous model is extended to the new classes and trained with plain
cross-entropy on the new data plus the exemplars, without distillation (docs/methods.md, "finetune").
"""

from __future__ import annotations

from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Context, Method, MethodConfig, reset_classifier
from cilkit.settings.options import option


class FinetuneConfig(MethodConfig):
    reinit_classifier: bool = option(
        False, state0=False,
        help="re-initialise every row of the linear head (old and new) at each state b >= 1 (IL2M's original code)")


@register("finetune")
class Finetune(Method):
    description = "fine-tuning with memory: cross-entropy on new data + exemplars, no distillation"
    Config = FinetuneConfig
    cfg: FinetuneConfig
    stores_features = True  # ScaIL rectifies any fine-tuning run (cilkit calibrate --with scail)

    def before_state(self, ctx: Context) -> None:
        super().before_state(ctx)
        if self.cfg.reinit_classifier and ctx.state.index > 0:
            reset_classifier(ctx.model, f"{self.name}.reinit_classifier")
