"""IL2M, class incremental learning with dual memory (Belouadah & Popescu, ICCV 2019).

Training is fine-tuning with memory (:mod:`cilkit.methods.finetune`). The second, tiny memory
holds class statistics, which the runner computes after every state of every run
(:func:`cilkit.training.class_statistics.state_statistics`, saved as ``stats/state_XX.json`` and handed to the
method as ``ctx.statistics``): the initial mean score of each class, the model confidence of
each state and the current mean score of each old class over its exemplars. At inference, the
old-class scores of every image whose top-1 class is new are rectified with them
(:func:`cilkit.cil.rectify.il2m_rectify`).

``reinit_classifier`` defaults to false, so that an ``il2m`` run trains exactly as the default
``finetune`` run (its ``cnn`` scores are that run's) and ``cilkit calibrate --with il2m`` of a
finetune run gives the same numbers; ``il2m: {reinit_classifier: true}`` re-initialises the
classifier each state as IL2M's original code does.

A weak model can have a non-positive current mean score for an old class; the factor
``init_mean / cur_mean`` then flips the sign of that class's scores (the original code and
FACIL do so; a weak digits model fell to 4% top-1, below chance). cilkit keeps that behaviour by
default, records the classes in the statistics (``nonpositive_cur_mean``) and warns in the log;
``guard_nonpositive: true`` leaves such classes unrectified instead.
"""

from __future__ import annotations

from typing import Any

import torch

from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Context
from cilkit.methods.finetune import Finetune, FinetuneConfig
from cilkit.settings.options import option
from cilkit.cil.rectify import il2m_from_stats


class IL2MConfig(FinetuneConfig):
    guard_nonpositive: bool = option(
        False, state0=False, help="leave classes with cur_mean <= 0 unrectified (not in the paper)")


@register("il2m")
class IL2M(Finetune):
    description = "fine-tuning with memory + IL2M rectification of old-class scores by class statistics"
    Config = IL2MConfig
    cfg: IL2MConfig
    primary_scores = "il2m"

    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits rectified with this state's class statistics (the same the run saves, so
        a live run and ``cilkit calibrate`` give the same numbers)."""
        if ctx.statistics is None:
            raise ValueError("il2m predicts after the runner's statistics step (ctx.statistics is unset)")
        return il2m_from_stats(out["logits"], ctx.statistics, self.cfg.guard_nonpositive)

    def statistics_warnings(self, ctx: Context, stats: dict[str, Any]) -> list[str]:
        if self.cfg.guard_nonpositive or not stats["nonpositive_cur_mean"]:
            return []
        classes = ", ".join(str(ctx.scenario.order[c]) for c in stats["nonpositive_cur_mean"])
        return [f"old class(es) {classes} have a mean score <= 0 on their exemplars; IL2M's rectification "
                "flips the sign of their scores (il2m.guard_nonpositive: true leaves them unrectified)"]

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"cnn": out["logits"]}
