"""EEIL, End-to-End Incremental Learning (Castro et al., ECCV 2018).

Per state ``b >= 1`` (state 0 is plain cross-entropy training, as in the paper and FACIL):

* **Training with cross-distillation** (Sec. 3, Eq. 1-2): ``L = L_C + lambda * sum_f L_D_f``
  on the new images plus the exemplars. ``L_C`` is the cross-entropy over all seen classes;
  ``f`` runs over the *old classification layers*, one per earlier state (the classes each
  state added, a contiguous range of class positions), and ``L_D_f`` is the cross-entropy
  between softmax(teacher logits of the group / T) and softmax(student logits of the group / T)
  (:func:`~cilkit.methods.base.distillation_kl`), ``T = 2`` (Sec. 4: "we set T to 2"), the
  teacher the model of state ``b - 1``. The groups are distilled separately (a softmax over
  each state's classes), as the paper's per-layer sum says, not as one softmax over all old
  classes (:func:`cross_distillation`).
* **Balanced finetuning** (Sec. 4, "Balanced fine-tuning"): after training, the whole network
  trains on a set with as many images of every new class as of every old one, with the
  cross-entropy, the distillation of every earlier state's group and a *temporary*
  distillation of the new classes' group (:class:`BalancedStage`). As in the authors' code
  (``incremental_training.m``: the balanced set's distillation labels are recomputed with
  ``eval_softmax`` on the model that left the first stage, for every head), the teacher of
  every group in this stage is a frozen copy of the model as it left the first stage. The
  authors' schedule (``experiment_cifar.m``, ``incremental_training.m``): 40 epochs of training
  at lr 0.1 divided by 10 every 10 epochs, then 30 of balanced finetuning starting at 0.01,
  divided by 10 every 10 (``finetune_epochs``, ``finetune_lr``, ``finetune_milestones``).

Readings chosen:

* The balanced set is the exemplar memory after its update: the runner has stored, for every
  seen class, the same share of the fixed total (``floor(K / n_seen)``, herding with the model
  as it left the first stage), so the memory is a set with as many images of each new class as
  of each old one. The authors' code herds, for each new class, as many images as an old class
  held *before* the state (``K / n_old``), trains on that larger set, then trims the memory to
  ``K``; cilkit's memory holds the re-balanced share, so its balanced set has ``K`` images.
  FACIL (``approach/eeil.py``) takes instead a random subset of the new data as large as the
  whole memory (each new class gets ``n_old / n_new`` times more than an old one), which is not
  balanced; we follow the paper and the authors.
* FACIL distils the old heads ``0 .. t-2`` in the first stage and ``0 .. t-1`` in the balanced
  one, with a binary cross-entropy on the softmax outputs, and has no temporary distillation of
  the new classes; we distil every earlier state's group in both stages with the paper's
  softmax cross-entropy, and add the temporary term, as the paper and the authors' code do.
* Not implemented: the paper's extra training data (brightness, contrast, crops and mirrors of
  every image, added to the training set) and its gradient noise (FACIL's ``--noise-grad``, off
  by default there). cilkit's usual crop and flip augmentation applies.

Records (results.json ``states[b]["eeil"]``): ``finetune``, the balanced stage's images, final
loss and time.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cilkit.settings.config import ScheduleConfig
from cilkit.common.errors import UserError
from cilkit.settings.registry import register_method as register
from cilkit.methods.base import (Batch, Context, FitHooks, LossTerms, Method, MethodConfig, distillation_kl, freeze,
                                 stage_record)
from cilkit.methods.finetune import Finetune
from cilkit.models import IncrementalNet
from cilkit.settings.options import option


class EEILConfig(MethodConfig):
    # state 0 is plain cross-entropy training: every option acts from state 1 on
    temperature: float = option(
        2.0, gt=0, state0=False, help="T of every distillation (Sec. 4: \"we set T to 2 for all our experiments\")")
    lambda_kd: float = option(1.0, ge=0, state0=False,
                              help="weight of the distillation sum (Eq. 1 has none: 1)")
    finetune_epochs: int = option(30, ge=0, state0=False,
                                  help="balanced finetuning epochs (the authors' 30; 0: no such stage)")
    finetune_lr: float = option(0.01, gt=0, state0=False,
                                help="its starting learning rate (the authors' 0.01)")
    finetune_milestones: list[int] = option(
        default_factory=lambda: [10, 20], state0=False,
        help="epochs after which its lr is divided by 10 (the authors': every 10 epochs)")
    temporary_distillation: bool = option(
        True, state0=False, help="the balanced stage also distils the new classes' group (Sec. 4)")
    quick: ClassVar[dict[str, Any]] = {"eeil.finetune_epochs": 1}


def cross_distillation(
    logits: torch.Tensor, teacher_logits: torch.Tensor, groups: list[range], temperature: float
) -> torch.Tensor:
    """``sum_f L_D_f`` (EEIL Eq. 1-2): for each class group ``f`` (the classes one state added),
    the softmax distillation at ``temperature`` of the student's logits of the group from the
    teacher's, each averaged over the batch."""
    total = logits.new_zeros(())
    for g in groups:
        total = total + distillation_kl(logits[:, g.start : g.stop], teacher_logits[:, g.start : g.stop], temperature)
    return total


@register("eeil")
class EEIL(Method):
    description = ("EEIL: cross-entropy + per-state softmax cross-distillation (T 2), then balanced finetuning on "
                   "the memory with a temporary distillation of the new classes")
    Config = EEILConfig
    cfg: EEILConfig
    needs_teacher = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.cfg.finetune_epochs > 0 and not self.run_config.memory.enabled:
            raise UserError("config key 'eeil.finetune_epochs': the balanced finetuning needs an exemplar memory "
                            "(set memory.total or memory.per_class, or eeil.finetune_epochs: 0)")

    def state0_like(self) -> type[Method]:
        """State 0 is fine-tuning (cross-entropy; nothing to distil, no balanced stage)."""
        return Finetune

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        logits = out["logits"]
        terms = {"ce": F.cross_entropy(logits, batch.y)}
        if batch.teacher is not None and ctx.state.n_old > 0:
            terms["kd"] = self.cfg.lambda_kd * self.old_distillation(ctx, batch, logits)
        return terms

    def old_distillation(self, ctx: Context, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """The distillation of every earlier state's classes from the previous model."""
        assert batch.teacher is not None
        groups = [ctx.scenario.state_range(s) for s in range(ctx.state.index)]
        return cross_distillation(logits, batch.teacher["logits"], groups, self.cfg.temperature)

    def after_state(self, ctx: Context) -> None:
        if ctx.state.index > 0 and self.cfg.finetune_epochs > 0:
            self.balanced_finetune(ctx)

    def balanced_finetune(self, ctx: Context) -> None:
        """The whole network on the memory of every seen class (balanced: see the module's
        docstring), distilled from the model as it left the first stage."""
        indices = ctx.memory.indices(ctx.state.seen)
        stage_teacher = freeze(copy.deepcopy(ctx.model))
        schedule = ScheduleConfig(type="multistep", milestones=self.cfg.finetune_milestones, gamma=0.1)
        spec = ctx.fit.replace(epochs=self.cfg.finetune_epochs, lr=self.cfg.finetune_lr, schedule=schedule)
        fit = ctx.engine.fit(ctx, BalancedStage(self, stage_teacher), indices, spec,
                             desc=f"state {ctx.state.index + 1} balanced finetuning", stage="balanced finetuning")
        ctx.record.results["finetune"] = stage_record(indices, fit)


class BalancedStage(FitHooks):
    """EEIL's balanced finetuning as ``engine.fit`` hooks: cross-entropy plus the distillation,
    from ``stage_teacher`` (the model after the first stage), of every earlier state's group and,
    with ``temporary_distillation``, of the new classes' group."""

    def __init__(self, method: EEIL, stage_teacher: IncrementalNet) -> None:
        self.method, self.stage_teacher = method, stage_teacher

    def teacher(self, ctx: Context) -> torch.nn.Module:
        """The model as it left the first stage."""
        return self.stage_teacher

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        cfg, b = self.method.cfg, ctx.state.index
        logits = out["logits"]
        assert batch.teacher is not None
        groups = [ctx.scenario.state_range(s) for s in range(b + 1 if cfg.temporary_distillation else b)]
        return {"ce": F.cross_entropy(logits, batch.y),
                "kd": cfg.lambda_kd * cross_distillation(logits, batch.teacher["logits"], groups, cfg.temperature)}
