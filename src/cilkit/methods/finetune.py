"""Fine-tuning with memory (FT): the baseline of IL2M and of active IL.

At each state the previous model is extended to the new classes and trained with plain
cross-entropy on the new data plus the exemplars, without distillation (docs/methods.md, "finetune").
"""

from __future__ import annotations

from typing import ClassVar

from cilkit.methods import register
from cilkit.methods.base import Context, Method, MethodConfig, reset_classifier


class FinetuneConfig(MethodConfig):
    # IL2M's original code re-initialises the whole classifier layer at each state.
    reinit_classifier: bool = False


@register("finetune")
class Finetune(Method):
    description = "fine-tuning with memory: cross-entropy on new data + exemplars, no distillation"
    Config = FinetuneConfig
    cfg: FinetuneConfig
    state0_free_options: ClassVar[tuple[str, ...]] = ("reinit_classifier",)  # acts from state 1 on
    stores_features = True  # ScaIL rectifies any fine-tuning run (cilkit calibrate --with scail)

    def before_state(self, ctx: Context) -> None:
        super().before_state(ctx)
        if self.cfg.reinit_classifier and ctx.state.index > 0:
            reset_classifier(ctx.model, f"{self.name}.reinit_classifier")
