"""Joint training: the upper bound that keeps ALL training data of every seen class.

Each state continues from the previous model (as FACIL's ``joint``) and trains with
cross-entropy on the full training data of all classes seen so far; the memory is unused.
"""

from __future__ import annotations

import torch

from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Context, Method


@register("joint")
class Joint(Method):
    description = "upper bound: cross-entropy on all training data of all seen classes"
    reference = True  # an upper bound, not a contender: never bold in table.tex

    def train_set(self, ctx: Context) -> torch.Tensor:
        return ctx.scenario.train_indices_of(ctx.state.seen)
