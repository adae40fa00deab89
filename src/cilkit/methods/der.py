"""DER, Dynamically Expandable Representation (Yan, Xie & He, "DER: Dynamically Expandable
Representation for Class Incremental Learning", CVPR 2021).

Written from the paper and checked against the authors' code (Rhyssiyan/DER-ClassIL.pytorch:
``inclearn/models/incmodel.py``, ``inclearn/convnet/network.py``, ``inclearn/convnet/utils.py``
``finetune_last_layer``, ``inclearn/tools/data_utils.py`` ``construct_balanced_subset`` and the
options file ``exps/der_womask/cifar100/b0/10steps/configs/1.yaml``) and PyCIL (G-U-N/PyCIL,
``models/der.py`` and ``utils/inc_net.py``, ``DERNet``).

Per state ``b >= 1`` (state 0 is plain cross-entropy training of one extractor, as in both codes):

* **Expansion.** A new feature extractor is appended (``IncrementalNet.grow_backbone``): the
  old ones are frozen (no gradient, batch norm in eval mode), the features of all are
  concatenated, oldest first, and the classifier reads the concatenation. The new extractor
  starts from the previous one's weights (``init_from_previous``; both codes load
  ``convnets[-2]``'s state dict into the new one). The classifier's old rows keep their
  weights over the old features and get zero weights over the new ones (cilkit's
  ``IncrementalLinear.add_inputs``); PyCIL leaves those at the random init of its new, wider
  layer, and the authors' options file draws the whole classifier afresh (``reuse_oldfc:
  False``) -- their classifier-learning stage re-initialises it anyway.
* **Training loss** (the paper's ``L_ER = L_Ht + lambda_a L_Ht^a``): the cross-entropy of the
  classifier over all seen classes, plus ``aux_weight`` (``lambda_a``; 1 in both codes) times
  the cross-entropy of the auxiliary classifier: a linear layer over the new extractor's
  features alone with ``n_new + 1`` outputs, every old class one class "old" (target 0) and new
  class ``k`` (class position) the target ``k - n_old + 1`` (:func:`aux_targets`; the authors'
  ``aux_n+1``, PyCIL's ``torch.where``). A fresh auxiliary head each state, named ``der``
  (``IncrementalNet.set_aux_head``, so a resume rebuilds it from the checkpoint).
* **Classifier learning** (``classifier_stage: retrain``, the paper's second stage and the
  authors' ``decouple``): after training, the classifier is re-initialised and retrained alone
  (the extractors and the auxiliary head frozen, the whole model in eval mode, as the authors'
  ``finetune_last_layer`` runs it) on a class-balanced subset of the state's training data
  (new images + the exemplars it trained on): every class cut to the size of its smallest one by
  a seeded random draw, once per state (``construct_balanced_subset``). Cross-entropy of the
  logits divided by a temperature (the authors' 5), 30 epochs from lr 0.1 divided by 10 after 15
  (``retrain_epochs``, ``retrain_lr``, ``retrain_milestones``, ``retrain_temperature``); SGD with
  the run's momentum, weight decay and batch size (the authors': 0.9, 5e-4, 128). PyCIL's DER
  has no such stage; it aligns the new classes' weight norms to the old ones' instead (WA,
  ``weight_align`` after each incremental state): ``classifier_stage: align`` is PyCIL's,
  ``none`` keeps the classifier as trained.

Readings chosen:

* The classifier learning is the paper's and the authors', so it is the default; PyCIL's
  weight aligning is offered (``align``). It runs after the memory update: herding reads the
  features, which the stage does not change, so the exemplars are those the authors build
  after it.
* The classifier has a bias (cilkit's linear head, as PyCIL's ``SimpleLinear``); the authors'
  options file has none (``use_bias: False``).
* Not followed: the authors' 10-epoch gradual learning-rate warm-up in every state and the
  re-initialisation of the classifiers at its end (cilkit's schedules have no warm-up; PyCIL
  has neither).
* **Not implemented: the paper's channel-level mask and pruning** (the learnable masks with
  their sparsity loss, then pruning of the masked channels): neither the authors' public code
  (its experiments are ``der_womask``, "DER wo mask") nor PyCIL implements it, so cilkit runs
  DER without pruning, the paper's "DER w/o P" rows; each state's model grows by one full
  extractor.

State 0 is fine-tuning's cross-entropy training, but on a growing backbone (its parameters
are named by branch), so its state-0 cache entries are not fine-tuning's; DER runs share
entries between themselves (every option is unread in state 0). Records (results.json
``states[b]["der"]``, ``b >= 1``): ``branches`` (extractors held), ``trainable_parameters``
of the state's training, and ``classifier``: the retraining's balanced images, images per
class, final loss and time, or ``gamma`` of the alignment.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from cilkit.common.seeding import seeded_generator
from cilkit.methods.base import (Batch, Context, FitHooks, LossTerms, Method, MethodConfig, frozen, head_of,
                                 reset_classifier, stage_record)
from cilkit.methods.wa import aligned_weights
from cilkit.models import GrowingBackbone, IncrementalLinear, IncrementalNet, build_backbone
from cilkit.settings.config import ScheduleConfig
from cilkit.settings.options import option
from cilkit.settings.registry import register_method as register

AUX_HEAD = "der"


class DERConfig(MethodConfig):
    # state 0 trains one extractor with cross-entropy: every option acts from state 1 on
    aux_weight: float = option(1.0, ge=0, state0=False,
                               help="lambda_a, weight of the auxiliary classifier's cross-entropy (both codes: 1)")
    init_from_previous: bool = option(
        True, state0=False,
        help="a new extractor starts from the previous one's weights (the authors' code and PyCIL); false: a fresh init")
    classifier_stage: Literal["retrain", "align", "none"] = option(
        "retrain", state0=False,
        help="after each state b >= 1: retrain (the paper's classifier learning: re-initialised, trained on "
             "class-balanced data), align (PyCIL: the new classes' weight norms scaled to the old ones'), none")
    retrain_epochs: int = option(30, ge=1, state0=False, help="epochs of the classifier learning (the authors' 30)")
    retrain_lr: float = option(0.1, gt=0, state0=False, help="its starting learning rate (the authors' 0.1)")
    retrain_milestones: list[int] = option(
        default_factory=lambda: [15], state0=False,
        help="epochs after which its lr is divided by 10 (the authors': 15)")
    retrain_temperature: float = option(
        5.0, gt=0, state0=False, help="its cross-entropy reads the logits divided by this (the authors' 5)")
    quick: ClassVar[dict[str, Any]] = {"der.retrain_epochs": 1}


# ----- the formulas ---------------------------------------------------------------------------
def aux_targets(labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """The auxiliary classifier's targets: 0 for every old class (position ``< n_old``), and
    ``k - n_old + 1`` for new class ``k``."""
    return torch.where(labels >= n_old, labels - n_old + 1, torch.zeros_like(labels))


def der_loss(logits: torch.Tensor, labels: torch.Tensor, aux_logits: torch.Tensor | None, n_old: int,
             aux_weight: float) -> LossTerms:
    """``CE(logits, y)`` and, with an auxiliary head (states ``b >= 1``), ``aux_weight *
    CE(aux_logits, aux_targets(y))``."""
    terms = {"ce": F.cross_entropy(logits, labels)}
    if aux_logits is not None:
        terms["aux"] = aux_weight * F.cross_entropy(aux_logits, aux_targets(labels, n_old))
    return terms


def balanced_subset(indices: torch.Tensor, positions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``indices`` with every class (``positions``, one per index) cut to as many images as its
    smallest class has, each class's kept images drawn at random without replacement (the
    authors' ``construct_balanced_subset``); class by class, in class order."""
    classes = torch.unique(positions)
    smallest = min(int((positions == c).sum()) for c in classes)
    kept = []
    for c in classes:
        members = indices[positions == c]
        kept.append(members[torch.randperm(members.numel(), generator=generator)[:smallest]])
    return torch.cat(kept)


def only_head_trains(model: IncrementalNet) -> contextlib.AbstractContextManager[None]:
    """Every parameter but the classifier's frozen inside the block (the extractors and the
    auxiliary heads); their flags restored after it."""
    return frozen(p for name, p in model.named_parameters() if not name.startswith("head."))


# ----- the method ------------------------------------------------------------------------------
@register("der")
class DER(Method):
    description = ("DER: a new feature extractor per state (the old ones frozen), the classifier over their "
                   "concatenated features, an auxiliary classifier (new classes + one \"old\") over the new one's; "
                   "then classifier learning on class-balanced data (no channel pruning)")
    Config = DERConfig
    cfg: DERConfig
    needs_memory = True  # the paper's protocol; the classifier learning needs the old classes' exemplars

    def build_model(self, in_channels: int, image_size: int) -> IncrementalNet:
        m = self.run_config.model

        def extractor() -> torch.nn.Module:
            return build_backbone(m.backbone, in_channels=in_channels, image_size=image_size, width=m.width)

        backbone = GrowingBackbone(extractor)
        return IncrementalNet(backbone, IncrementalLinear(backbone.out_dim))

    def _backbone(self, ctx: Context) -> GrowingBackbone:
        backbone = ctx.model.backbone
        if not isinstance(backbone, GrowingBackbone):
            raise TypeError("DER needs the GrowingBackbone built by its build_model")
        return backbone

    # ----- hooks -------------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        if ctx.state.index > 0:
            self.expand(ctx)
        super().before_state(ctx)  # the head grows by the new classes
        if ctx.state.index > 0:
            ctx.model.set_aux_head(AUX_HEAD, ctx.state.n_new + 1, source="branch")
            ctx.record.results["branches"] = len(self._backbone(ctx).backbones)
            ctx.record.results["trainable_parameters"] = sum(
                p.numel() for p in ctx.model.parameters() if p.requires_grad)

    def expand(self, ctx: Context) -> None:
        """A new extractor (the old ones frozen, the classifier widened), from the previous
        one's weights with ``init_from_previous``."""
        new = ctx.model.grow_backbone(freeze_old=True)
        if self.cfg.init_from_previous:
            new.load_state_dict(self._backbone(ctx).backbones[-2].state_dict())

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        aux = out.get("aux", {}).get(AUX_HEAD) if ctx.state.index > 0 else None
        return der_loss(self.class_logits(ctx, out), batch.y, aux, ctx.state.n_old, self.cfg.aux_weight)

    def after_state(self, ctx: Context) -> None:
        if ctx.state.index == 0 or self.cfg.classifier_stage == "none":
            return
        if self.cfg.classifier_stage == "align":
            self.align(ctx)
        else:
            self.retrain_classifier(ctx)

    def align(self, ctx: Context) -> None:
        """PyCIL's ``weight_align``: the new classes' rows scaled to the old rows' mean norm."""
        head = head_of(ctx, IncrementalLinear, "DER")
        rows, gamma = aligned_weights(head.weight.detach(), ctx.state.n_old)
        with torch.no_grad():
            head.weight.copy_(rows)
        ctx.record.results["classifier"] = {"gamma": float(gamma)}

    def retrain_classifier(self, ctx: Context) -> None:
        """The paper's classifier learning: the classifier re-initialised, then trained alone on
        a class-balanced subset of what the state trained on."""
        assert ctx.trained is not None and ctx.trained.rounds, "the runner records what the state trained on"
        trained = ctx.trained.rounds[-1]
        positions = ctx.scenario.train_pos[trained]
        indices = balanced_subset(trained, positions, seeded_generator(ctx.config.seed, "der-balanced", ctx.state.index))
        reset_classifier(ctx.model, f"{self.name}.classifier_stage")
        schedule = ScheduleConfig(type="multistep", milestones=self.cfg.retrain_milestones, gamma=0.1)
        spec = ctx.fit.replace(epochs=self.cfg.retrain_epochs, lr=self.cfg.retrain_lr, schedule=schedule)
        with only_head_trains(ctx.model):
            fit = ctx.engine.fit(ctx, ClassifierLearning(self.cfg.retrain_temperature), indices, spec,
                                 desc=f"state {ctx.state.index + 1} classifier learning", stage="classifier learning")
        ctx.record.results["classifier"] = {**stage_record(indices, fit),
                                            "per_class": int(indices.numel()) // int(torch.unique(positions).numel())}


class ClassifierLearning(FitHooks):
    """DER's classifier learning as ``engine.fit`` hooks: the classifier's weight and bias the
    only parameters, the whole model in eval mode (the authors' ``network.eval()``: the
    extractors' batch-norm statistics fixed), the cross-entropy of ``logits / temperature``."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def train_mode(self, ctx: Context, model: torch.nn.Module) -> None:
        model.eval()

    def param_groups(self, ctx: Context) -> list[dict[str, Any]]:
        head = head_of(ctx, IncrementalLinear, "DER")
        return [{"params": [head.weight, head.bias]}]

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        return {"ce": F.cross_entropy(out["logits"] / self.temperature, batch.y)}
