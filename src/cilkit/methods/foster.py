"""FOSTER, Feature Boosting and Compression (Wang, Zhou, Ye & Zhan, "FOSTER: Feature Boosting and
Compression for Class-Incremental Learning", ECCV 2022).

Written from the authors' code as PyCIL carries it (G-U-N/PyCIL, ``models/foster.py``,
``utils/inc_net.py`` ``FOSTERNet``, ``exps/foster.json``; the full code, G-U-N/ECCV22-FOSTER, was
not read), and the paper's two stages as its title and abstract name them; the paper's text was
not at hand, so no equation numbers are cited. State 0 is plain cross-entropy training
(fine-tuning's, and it shares fine-tuning's state-0 cache entries). Each state ``b >= 1`` has two
stages, both run by the engine's fit:

1. **Feature boosting** (PyCIL ``_feature_boosting``): a two-branch model, the
   previous model's extractor (frozen, in eval mode) beside a new one initialised from it
   (``FOSTERNet.update_fc`` loads the old extractor's weights into the new one), built as a
   :class:`~cilkit.models.GrowingBackbone` through ``IncrementalNet.grow_backbone``. Its
   classifier reads both features; ``fe``, an auxiliary classifier (``set_aux_head``) over the
   new extractor's features, predicts every seen class. The loss of a batch is
   ``CE(logits / w1, y) + CE(fe_logits, y) + lambda_kd * KD(logits[:, :n_old], old_logits, T)``
   (:func:`boosting_loss`): ``w1`` the per-class weights of the effective number of samples
   (Cui et al. 2019; ``beta1``, :func:`effective_number_weights`) dividing the logits (the
   logits adjustment, FOSTER's handling of the old/new imbalance); ``old_logits`` the previous
   classifier over the old extractor's features (PyCIL's ``oldfc``: the previous model's logits);
   KD the softmax cross-entropy at ``T`` averaged over the batch, no ``T^2``.
2. **Feature compression** (PyCIL ``_feature_compression``): a single-extractor student
   initialised from the previous model (PyCIL: ``convnets[0]`` and ``oldfc`` copied; the new
   classes' rows fresh) is trained with the balanced distillation ``BKD`` from the boosted
   two-branch model's logits alone, no cross-entropy (:func:`balanced_kd`): the teacher's
   softmax at ``T`` times the per-class weights of ``beta2``, renormalised, as the target of the
   student's log-softmax. The student is the run's model itself (its head grown as every
   method's in ``before_state``), so the model the run keeps between states is one extractor:
   the method never grows the run's model, and a resume needs no grown shape.

Readings, where cilkit and PyCIL part:

* The boosting stage runs in ``before_state`` (the run's model is still the previous one, the
  student's starting point) and compression is the state's main fit (``fit_spec``: the
  ``compression_*`` options; PyCIL's compression SGD has no weight decay and the boosting's
  learning rate, under the same cosine schedule). The boosting stage's schedule is the run's
  ``train`` section for the state (PyCIL: ``boosting_epochs`` 170, lr 0.1, weight decay 5e-4,
  cosine). Both train on the state's new data plus the memory, as PyCIL's one train loader.
* The class counts are those of the state's training set (new images and exemplars);
  PyCIL takes the memory's nominal share for every old class and 500 for every CIFAR-100 new
  class, which are the same numbers there. A class without an image counts as one.
* The widened classifier starts with the old classes' rows over the new extractor's features at
  zero (``IncrementalLinear.add_inputs``), so the boosted model's logits equal the previous
  model's when boosting starts; PyCIL's fresh ``fc`` leaves those entries at their random init.
  The new rows and the ``fe`` head are freshly initialised in both.
* The memory is herded with the model the run holds when it updates the memory, the compressed
  student; PyCIL herds with the two-branch teacher's concatenated features. Evaluation scores the
  student, the model FOSTER keeps; PyCIL's ``eval_task`` scores the two-branch teacher and logs
  the student's accuracy as "darknet eval".
* ``oofc: az`` (PyCIL): the new classes' weights over the old extractor's features are set to
  zero before boosting and kept there (PyCIL zeroes their gradients; here they are zeroed again
  after every step, which leaves every output the same); ``ft`` (default) trains them.
* ``teacher_wa`` / ``student_wa`` (PyCIL's ``is_teacher_wa`` / ``is_student_wa``, both off in its
  config): weight aligning of the new rows after boosting / compression, by
  ``gamma = mean ||W_old|| / mean ||W_new|| * wa_value ** (n_old / n_new)`` (``FOSTERNet.weight_align``).

PyCIL's ``exps/foster.json`` (CIFAR-100 B50-10): ``beta1`` 0.96, ``beta2`` 0.97, ``oofc: ft``,
no weight aligning, ``lambda_okd`` 1, ``T`` 2, 200 epochs in state 0, 170 of boosting, 130 of
compression, lr 0.1, batch 128, memory 20 per class. Records (results.json ``states[b]["foster"]``,
``b >= 1``): ``boosting`` (the stage's images, final loss and time), ``weight_old`` /
``weight_new`` (mean logit-adjustment weight ``w1`` of an old / a new class), ``teacher_gamma``
and ``student_gamma`` (null when not aligned).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from cilkit.methods.base import (Batch, Context, FitHooks, FitSpec, LossTerms, Method, MethodConfig, distillation_kl,
                                 freeze, head_of, stage_record)
from cilkit.methods.finetune import Finetune
from cilkit.models import GrowingBackbone, IncrementalLinear, IncrementalNet
from cilkit.settings.options import option
from cilkit.settings.registry import register_method as register

FE_HEAD = "fe"  # the auxiliary classifier over the new extractor's features


class FOSTERConfig(MethodConfig):
    # state 0 is fine-tuning's: every option acts from state 1 on
    beta1: float = option(0.96, ge=0, lt=1, state0=False,
                          help="beta of the effective-number weights that divide the logits in boosting (PyCIL 0.96)")
    beta2: float = option(0.97, ge=0, lt=1, state0=False,
                          help="beta of the effective-number weights of the balanced KD in compression (PyCIL 0.97)")
    lambda_kd: float = option(1.0, ge=0, state0=False,
                              help="weight of the old logits' distillation in boosting (PyCIL lambda_okd: 1)")
    temperature: float = option(2.0, gt=0, state0=False, help="T of both distillations (PyCIL 2)")
    compression_epochs: int = option(130, ge=1, state0=False,
                                     help="epochs of feature compression, the state's main fit (PyCIL 130; "
                                          "boosting takes train.epochs)")
    compression_lr: float | None = option(None, gt=0, state0=False,
                                          help="learning rate of compression (null: the state's train.lr, as PyCIL)")
    compression_weight_decay: float = option(0.0, ge=0, state0=False,
                                             help="weight decay of compression (PyCIL: none)")
    oofc: Literal["ft", "az"] = option(
        "ft", state0=False, help="the new classes' weights over the old features: ft trains them (PyCIL's "
                                 "config), az holds them at zero")
    teacher_wa: bool = option(False, state0=False,
                              help="weight-align the new classes' rows of the boosted model (PyCIL is_teacher_wa: off)")
    student_wa: bool = option(False, state0=False,
                              help="weight-align the new classes' rows of the student (PyCIL is_student_wa: off)")
    wa_value: float = option(1.0, gt=0, state0=False,
                             help="gamma of weight aligning times wa_value ** (n_old / n_new) (PyCIL 1)")
    quick: ClassVar[dict[str, Any]] = {"foster.compression_epochs": 1}


# ----- the formulas ---------------------------------------------------------------------------
def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-class weights ``(1 - beta) / (1 - beta ** n_c)`` (the effective number of samples,
    Cui et al. 2019), scaled to sum to the number of classes (PyCIL ``_train``). A class with
    no sample counts as one."""
    n = counts.double().clamp(min=1)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.full_like(n, beta), n))
    return (w / w.sum() * n.numel()).float()


def boosting_loss(logits: torch.Tensor, fe_logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor, lambda_kd: float, temperature: float) -> LossTerms:
    """FOSTER's boosting loss: cross-entropy of the adjusted logits ``logits / weights``, the
    ``fe`` head's cross-entropy, and ``lambda_kd`` times the distillation of the old classes'
    logits from ``old_logits``."""
    return {"ce": F.cross_entropy(logits / weights, labels),
            "fe": F.cross_entropy(fe_logits, labels),
            "kd": lambda_kd * distillation_kl(logits[:, : old_logits.shape[1]], old_logits, temperature)}


def balanced_kd(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """BKD: ``-mean_x sum_c q_c log softmax(student / T)_c`` with ``q`` the teacher's softmax at
    ``T`` times the per-class ``weights``, renormalised per image."""
    q = F.softmax(teacher / temperature, dim=1) * weights
    q = q / q.sum(dim=1, keepdim=True)
    return -(q * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


def aligned_gamma(weight: torch.Tensor, n_old: int, value: float) -> torch.Tensor:
    """``FOSTERNet.weight_align``'s factor for the new rows of ``weight``."""
    norms = weight.norm(dim=1)
    n_new = weight.shape[0] - n_old
    return norms[:n_old].mean() / norms[n_old:].mean() * value ** (n_old / n_new)


# ----- the method ------------------------------------------------------------------------------
@register("foster")
class FOSTER(Method):
    description = ("FOSTER: boost a new extractor beside the frozen old one (logits adjusted by effective class "
                   "counts, an auxiliary head, KD of the old logits), then compress both into one extractor with "
                   "class-balanced KD")
    Config = FOSTERConfig
    cfg: FOSTERConfig
    needs_memory = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._boosted: IncrementalNet | None = None  # the state's two-branch teacher (b >= 1)
        self._compression_weights: torch.Tensor | None = None

    def state0_like(self) -> type[Method]:
        """State 0 is fine-tuning (cross-entropy, nothing to boost or compress)."""
        return Finetune

    def _counts(self, ctx: Context) -> torch.Tensor:
        """Images of each seen class in the state's training set."""
        labels = ctx.targets(ctx.dataset.train.labels[self.train_set(ctx)])
        return torch.bincount(labels, minlength=ctx.state.n_seen)

    # ----- hooks -------------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        """From state 1 on: build and train the two-branch model (feature boosting) from the
        previous model, then grow the run's model, the student, as every method does."""
        if ctx.state.index > 0:
            counts = self._counts(ctx)
            self._boosted = self._boost(ctx, effective_number_weights(counts, self.cfg.beta1).to(ctx.device))
            self._compression_weights = effective_number_weights(counts, self.cfg.beta2).to(ctx.device)
        super().before_state(ctx)

    def _boost(self, ctx: Context, weights: torch.Tensor) -> IncrementalNet:
        previous = head_of(ctx, IncrementalLinear, "FOSTER")
        old_head = (previous.weight.detach().clone(), previous.bias.detach().clone())
        model = two_branch_model(ctx.model, ctx.state.n_new)
        stage = BoostingStage(self, model, old_head, weights)
        if self.cfg.oofc == "az":
            stage.zero_new_old_block()
        indices = self.train_set(ctx)
        fit = ctx.engine.fit(ctx, stage, indices, FitSpec.of_state(ctx.config.train, ctx.state.index),
                             desc=f"state {ctx.state.index + 1} feature boosting", stage="feature boosting",
                             model=model)
        ctx.record.results.update({"boosting": stage_record(indices, fit), "weight_old":
                                   float(weights[: ctx.state.n_old].mean()),
                                   "weight_new": float(weights[ctx.state.n_old:].mean()), "teacher_gamma": None})
        if self.cfg.teacher_wa:
            ctx.record.results["teacher_gamma"] = align_new_rows(_linear(model), ctx.state.n_old, self.cfg.wa_value)
        return freeze(model)

    def fit_spec(self, ctx: Context, spec: FitSpec) -> FitSpec:
        """From state 1 on the state's fit is feature compression (PyCIL: no weight decay)."""
        if ctx.state.index == 0:
            return spec
        lr = self.cfg.compression_lr if self.cfg.compression_lr is not None else spec.lr
        return spec.replace(epochs=self.cfg.compression_epochs, lr=lr,
                            weight_decay=self.cfg.compression_weight_decay)

    def teacher(self, ctx: Context) -> torch.nn.Module | None:
        """The boosted two-branch model, the compression's teacher (none in state 0)."""
        return self._boosted if ctx.state.index > 0 else None

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        if ctx.state.index == 0:
            return {"ce": F.cross_entropy(out["logits"], batch.y)}
        assert batch.teacher is not None and self._compression_weights is not None
        return {"bkd": balanced_kd(out["logits"], batch.teacher["logits"], self._compression_weights,
                                   self.cfg.temperature)}

    def after_state(self, ctx: Context) -> None:
        if ctx.state.index == 0:
            return
        ctx.record.results["student_gamma"] = None
        if self.cfg.student_wa:
            head = head_of(ctx, IncrementalLinear, "FOSTER")
            ctx.record.results["student_gamma"] = align_new_rows(head, ctx.state.n_old, self.cfg.wa_value)
        self._boosted, self._compression_weights = None, None  # the teacher is the state's only


def two_branch_model(previous: IncrementalNet, n_new: int) -> IncrementalNet:
    """The boosting model built from ``previous`` (left unchanged): its extractor frozen beside a
    copy of it (PyCIL's new extractor starts from the old one's weights), its classifier widened
    to both features (zero weights over the new one's) and grown by ``n_new`` classes, and the
    ``fe`` head over the new extractor's features for every class."""
    if not isinstance(previous.head, IncrementalLinear):
        raise TypeError(f"FOSTER needs an IncrementalLinear head, not {type(previous.head).__name__}")
    model = IncrementalNet(GrowingBackbone(CopiesOf(previous.backbone)), copy.deepcopy(previous.head))
    model.train(previous.training)
    model.grow_backbone(freeze_old=True)
    model.add_classes(n_new)
    model.set_aux_head(FE_HEAD, model.num_classes, source="branch")
    return model


class CopiesOf:
    """A backbone factory (picklable) that returns copies of the extractor given, as it was."""

    def __init__(self, template: torch.nn.Module) -> None:
        self.template = copy.deepcopy(template)

    def __call__(self) -> torch.nn.Module:
        return copy.deepcopy(self.template)


def _linear(model: IncrementalNet) -> IncrementalLinear:
    assert isinstance(model.head, IncrementalLinear)
    return model.head


def align_new_rows(head: IncrementalLinear, n_old: int, value: float) -> float:
    """Scale the new classes' rows of ``head`` by :func:`aligned_gamma`; returns gamma."""
    with torch.no_grad():
        gamma = aligned_gamma(head.weight, n_old, value)
        head.weight[n_old:] *= gamma
    return float(gamma)


class BoostingStage(FitHooks):
    """FOSTER's feature boosting as ``engine.fit`` hooks, on the two-branch ``model``: the old
    logits are the previous classifier (``old_head``: weight, bias) over the old extractor's
    features, which are the previous model's own (the same frozen extractor in eval mode)."""

    def __init__(self, method: FOSTER, model: IncrementalNet, old_head: tuple[torch.Tensor, torch.Tensor],
                 weights: torch.Tensor) -> None:
        self.method, self.model, self.old_head, self.weights = method, model, old_head, weights
        self.old_dim = old_head[0].shape[1]

    def param_groups(self, ctx: Context) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        cfg = self.method.cfg
        old_logits = F.linear(out["features"][:, : self.old_dim].detach(), *self.old_head)
        return boosting_loss(out["logits"], out["aux"][FE_HEAD], old_logits, batch.y, self.weights,
                             cfg.lambda_kd, cfg.temperature)

    def after_step(self, ctx: Context) -> None:
        if self.method.cfg.oofc == "az":
            self.zero_new_old_block()

    def zero_new_old_block(self) -> None:
        """``oofc: az``: the new classes' weights over the old extractor's features held at zero."""
        n_old = self.old_head[0].shape[0]
        with torch.no_grad():
            _linear(self.model).weight[n_old:, : self.old_dim] = 0.0
