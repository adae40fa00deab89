"""IL2M, class incremental learning with dual memory (Belouadah & Popescu, ICCV 2019).

Training is fine-tuning with memory (:mod:`cilkit.methods.finetune`). The second, tiny memory
holds class statistics, which every run saves after each state (``stats/state_XX.json``, see
:func:`cilkit.calibration.state_statistics`): the initial mean score of each class, the model
confidence of each state and the current mean score of each old class over its exemplars. At
inference, the old-class scores of every image whose top-1 class is new are rectified with them
(:func:`cilkit.calibration.il2m_rectify`).

``reinit_classifier`` defaults to false, so that an ``il2m`` run trains exactly as the default
``finetune`` run (its ``cnn`` scores are that run's) and ``cilkit calibrate --with il2m`` of a
finetune run gives the same numbers; ``il2m: {reinit_classifier: true}`` re-initialises the
classifier each state as IL2M's original code does.
"""

from __future__ import annotations

import torch

from cilkit.calibration import il2m_from_stats, load_state_statistics
from cilkit.methods import register
from cilkit.methods.base import Context
from cilkit.methods.finetune import Finetune


@register("il2m")
class IL2M(Finetune):
    description = "fine-tuning with memory + IL2M rectification of old-class scores by class statistics"
    primary_scores = "il2m"

    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits rectified with this state's saved statistics (written by the runner just
        before evaluation, so a live run and ``cilkit calibrate`` use the same numbers)."""
        if ctx.run_dir is None:
            raise ValueError("il2m needs a run directory: its class statistics are read from stats/")
        return il2m_from_stats(out["logits"], load_state_statistics(ctx.run_dir, ctx.state.index))

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"cnn": out["logits"]}
