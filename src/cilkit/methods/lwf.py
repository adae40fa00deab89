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

It keeps no image (``needs_memory = False``): a run with a memory is refused in one line (run it
with ``memory.total: 0``, as its configs do; beside methods with a memory, ``--set
lwf:memory.total=0`` gives it a protocol of its own in the same command). With
``allow_memory: true`` it trains on the exemplars too (then ``bce`` is iCaRL with the network's
own classifier, iCaRL's ``cnn`` scores) and is labelled ``lwf (with memory N)`` wherever its
name appears. Scores: the logits.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Batch, Context, LossTerms, Method, MethodConfig, teacher_old_logits
from cilkit.methods.finetune import Finetune
from cilkit.methods.icarl import bce_divisor, distilled_loss
from cilkit.settings.options import option


class LwFConfig(MethodConfig):
    # state 0 has no teacher, so only the loss form and its scale shape the state-0 model
    loss: Literal["bce", "ce_kd"] = option(
        "bce", help="bce: LwF-MC (iCaRL's sigmoid BCE with the teacher's sigmoids as old-class targets); "
                    "ce_kd: cross-entropy + lambda_kd * softmax distillation at temperature (FACIL's reading)")
    bce_reduction: Literal["sum", "mean"] = option(
        "sum", help="bce only: sum over the seen classes (the paper's Alg. 3), mean over the batch; mean: also "
                    "divided by the run's number of classes (iCaRL's original code and its lr 2.0)")
    temperature: float = option(2.0, gt=0, state0=False, help="ce_kd only: T of the distillation (Li & Hoiem's 2)")
    lambda_kd: float = option(1.0, ge=0, state0=False,
                              help="ce_kd only: weight of the distillation (Li & Hoiem's lambda_o = 1)")
    allow_memory: bool = option(
        False, role="none", state0=False, resume="free",
        help="train on a memory when the run has one (refused otherwise: LwF keeps none); the run is then "
             "labelled 'lwf (with memory N)'")
    quick: ClassVar[dict[str, Any]] = {"memory.total": 0}  # LwF keeps no memory


def lwf_loss(
    logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor | None, cfg: LwFConfig, divisor: int = 1
) -> LossTerms:
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
    needs_memory = False  # a memory is refused unless lwf.allow_memory (then labelled "with memory N")

    def state0_like(self) -> type[Method] | None:
        """With ``ce_kd``, state 0 (no teacher) is fine-tuning's cross-entropy; ``bce`` is not."""
        return Finetune if self.cfg.loss == "ce_kd" else None

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        divisor = bce_divisor(self.cfg.bce_reduction, ctx.scenario.ends[-1])
        return lwf_loss(out["logits"], batch.y, teacher_old_logits(ctx, batch), self.cfg, divisor)
