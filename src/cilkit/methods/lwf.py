"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), in its
class-incremental form: the memory-free baseline.

Li & Hoiem learn new *tasks* with a new head each and distil the old heads' outputs on the new
data (their Eq. 2: ``L_old = -sum_i y'_o^(i) log y^_o^(i)`` over temperature-scaled softmaxes,
``T = 2``, ``lambda_o = 1``). A class-incremental test has no task label, so the heads are one
classifier over all seen classes. Two readings of that are in use; ``loss`` picks one:

* ``bce`` (default): LwF-MC, the baseline of iCaRL (Rebuffi et al., CVPR 2017, Sec. 4: "LwF-MC
  ... uses the same network architecture and training procedure as iCaRL, but no exemplars and
  classification by the network output"). The loss is iCaRL's Alg. 3: sigmoid binary
  cross-entropy over the seen classes, whose old-class targets are the previous model's
  sigmoid outputs and new-class targets the one-hot labels
  (:func:`cilkit.methods.icarl.icarl_bce`, reduced as ``bce_reduction`` says).
* ``ce_kd``: the multi-class reading of FACIL (``approach/lwf.py``: cross-entropy over all seen
  classes plus ``lamb`` times the cross-entropy between softmax(teacher old logits / T) and
  softmax(student old logits / T), lamb 1, T 2, no ``T^2`` factor), which is Li & Hoiem's Eq. 2
  with the heads merged (:func:`cilkit.methods.base.distillation_kl`).

Run it with ``memory.total: 0`` (its configs do): it is the method that keeps no image. With a
memory it trains on the exemplars too (then ``bce`` is iCaRL with the network's own
classifier, iCaRL's ``cnn`` scores). Scores: the logits.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cilkit.methods import register
from cilkit.methods.base import Batch, Context, Method, MethodConfig, teacher_old_logits
from cilkit.methods.finetune import Finetune
from cilkit.methods.icarl import bce_divisor, distilled_loss


class LwFConfig(MethodConfig):
    # bce: LwF-MC (iCaRL's sigmoid BCE with the teacher's sigmoids as old-class targets);
    # ce_kd: cross-entropy + lambda_kd * softmax distillation at `temperature` (FACIL's reading)
    loss: Literal["bce", "ce_kd"] = "bce"
    # bce only: "sum" over the seen classes, mean over the batch; "mean": also divided by the
    # run's number of classes (iCaRL's original code; see `cilkit info icarl`)
    bce_reduction: Literal["sum", "mean"] = "sum"
    temperature: float = Field(2.0, gt=0)  # ce_kd only: Li & Hoiem's T = 2
    lambda_kd: float = Field(1.0, ge=0)  # ce_kd only: Li & Hoiem's lambda_o = 1


def lwf_loss(
    logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor | None, cfg: LwFConfig, divisor: int = 1
) -> torch.Tensor:
    """The loss of one batch: ``logits`` over the seen classes, ``old_logits`` the teacher's over
    the old ones (None in state 0), ``divisor`` the BCE's (1, or the run's class count): iCaRL's
    loss function (:func:`~cilkit.methods.icarl.distilled_loss`) with LwF's options."""
    return distilled_loss(logits, labels, old_logits, cfg.loss, divisor, cfg.temperature, cfg.lambda_kd)


@register("lwf")
class LwF(Method):
    description = ("LwF (class-incremental): distillation from the previous model on the new data, no memory "
                   "(run with memory.total: 0); loss bce = iCaRL's LwF-MC, ce_kd = CE + softmax KD")
    Config = LwFConfig
    cfg: LwFConfig
    needs_teacher = True
    # state 0 has no teacher, so only the loss form and its scale shape the state-0 model
    state0_free_options = ("temperature", "lambda_kd")

    def state0_like(self) -> type[Method] | None:
        """With ``ce_kd``, state 0 (no teacher) is fine-tuning's cross-entropy; ``bce`` is not."""
        return Finetune if self.cfg.loss == "ce_kd" else None

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        divisor = bce_divisor(self.cfg.bce_reduction, ctx.scenario.ends[-1])
        return lwf_loss(out["logits"], batch.y, teacher_old_logits(ctx, batch.x), self.cfg, divisor)
