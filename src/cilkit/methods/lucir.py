"""LUCIR, "Learning a Unified Classifier Incrementally via Rebalancing" (Hou et al., CVPR 2019).

Written from the paper (Sec. 3 and 4.1) and checked against the authors' code
(hshustc/CVPR19_Incremental_Learning, ``class_incremental_cosine_*.py`` and
``incremental_train_and_eval_MR_LF.py``, run with ``--imprint_weights --less_forget
--adapt_lamda --mr_loss``, plus ``--cb_finetune`` for class-balanced finetuning).

- Model: the backbone without the ReLU after its last block, and a cosine classifier
  ``logits = sigma * cos(f, w_c)`` with one learnable scalar sigma, initialised to 1
  (Sec. 3.2, "cosine normalization"; :class:`cilkit.models.SplitCosineLinear`). State 0 trains
  it with plain cross-entropy. From state 1 the rows of the old classes are frozen (no gradient,
  not in the optimiser, so no weight decay either) and only the new rows are trained; sigma
  is shared and trained (with weight decay: the original puts it in the backbone's group).
- Imprinting (the original's ``--imprint_weights``, after Qi et al., CVPR 2018): before
  training a state, each new class's row is the normalised mean of the normalised features of
  its training images under the previous model (eval transform, no flip), rescaled to the mean
  norm of the old rows.
- Loss at states >= 1: ``CE(sigma * cos) + lambda * L_lf + mr_weight * L_mr``.
  * Less-forget constraint (Sec. 3.3): ``L_lf = mean over the batch of 1 - cos(f(x), f*(x))``
    between the current and the frozen previous model's features (the input of the
    classifier), with the adaptive weight ``lambda = lambda_base * sqrt(n_old / n_new)``.
  * Margin ranking (Sec. 3.4, inter-class separation), only for the batch's samples of old
    classes: with unscaled cosines, the ground-truth score against each of the top-K new-class
    scores, ``max(0, m - s_gt + s_k)``. Reading chosen: the MEAN over (old-class samples x K),
    as the original's ``nn.MarginRankingLoss`` computes it. The paper's equation sums over K
    and averages over the old samples, i.e. K times this value (``mr_weight: 2`` for K = 2).
- Class-balanced finetuning (optional, ``cbf: true``; the paper uses it on ImageNet): after
  training and the memory update, fine-tune the classifier on the exemplar memory (balanced:
  every seen class, the new ones included), 20 epochs, lr 0.01 x0.1 at epoch 10. Reading of the
  original's default ``--ft_flag 2``: the old and new class rows are trained; sigma and the
  feature extractor (its batch-norm statistics included) stay fixed. Its loss is the training
  loss without ``L_lf``: with fixed features that term is a constant (no gradient).
- Evaluation: the network's logits (``predict``, primary) and nearest-mean-of-exemplars
  (``nme``, :mod:`cilkit.methods.nme`).

Per state, ``results.json`` records under ``lucir``: ``lambda``, ``sigma`` (after the state) and,
with ``cbf``, the finetuning's ``cbf`` facts. The loss terms ``ce``, ``less_forget`` (``lambda *
L_lf``) and ``margin_ranking`` (``mr_weight * L_mr``) are in every epoch's line of history.jsonl.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from cilkit.cil.classwise import normalised_class_means
from cilkit.settings.config import ScheduleConfig
from cilkit.common.errors import UserError
from cilkit.settings.registry import register_method as register
from cilkit.methods.base import (Batch, Context, FitHooks, LossTerms, MethodConfig, frozen, head_of,
                                 stage_record)
from cilkit.methods.nme import WithClassMeans
from cilkit.models import IncrementalNet, SplitCosineLinear, build_model
from cilkit.settings.options import option


class LUCIRConfig(MethodConfig):
    # state 0 is cross-entropy on the cosine head; the rest acts from state 1 on (cbf: after training)
    lambda_base: float = option(
        5.0, ge=0, state0=False,
        help="base weight of the less-forget constraint (Sec. 4.1: 5 on CIFAR-100, 10 on ImageNet)")
    adaptive_lambda: bool = option(
        True, state0=False, help="lambda = lambda_base * sqrt(n_old / n_new) (Sec. 3.3); false: lambda = lambda_base")
    margin: float = option(0.5, ge=0, state0=False, help="margin m of the ranking loss (Sec. 3.4 / 4.1)")
    top_k: int = option(2, ge=1, state0=False,
                        help="K: hardest new classes per old-class sample in the margin ranking loss")
    mr_weight: float = option(1.0, ge=0, state0=False,
                              help="weight of the margin ranking loss (the original's lw_mr)")
    imprint: bool = option(True, state0=False,
                           help="imprint the new rows before each state (the original's --imprint_weights)")
    cbf: bool = option(False, state0=False,
                       help="class-balanced finetuning after each state b >= 1 (Sec. 4.1, ImageNet)")
    cbf_epochs: int = option(20, ge=0, state0=False, help="its epochs")
    cbf_lr: float = option(0.01, gt=0, state0=False, help="its learning rate")
    cbf_milestones: list[int] = option(default_factory=lambda: [10], state0=False,
                                       help="its epochs where the lr is divided by 10")


# ----- the formulas ---------------------------------------------------------------------------
def less_forget_weight(lambda_base: float, n_old: int, n_new: int, adaptive: bool = True) -> float:
    """LUCIR Sec. 3.3: ``lambda = lambda_base * sqrt(n_old / n_new)`` (``lambda_base`` if not
    adaptive)."""
    return lambda_base * math.sqrt(n_old / n_new) if adaptive else lambda_base


def less_forget_loss(features: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """LUCIR Sec. 3.3, less-forget constraint: ``mean_x (1 - cos(f(x), f*(x)))`` over the batch
    (the original's ``CosineEmbeddingLoss`` with target 1)."""
    return (1.0 - F.cosine_similarity(features, previous, dim=1)).mean()


def margin_ranking_loss(
    cosines: torch.Tensor, targets: torch.Tensor, n_old: int, k: int, margin: float
) -> torch.Tensor:
    """LUCIR Sec. 3.4, inter-class separation. For every sample of an old class (target <
    ``n_old``): ``max(0, margin - s_gt + s_j)`` for each of the ``k`` largest new-class cosines
    ``s_j`` (``cosines`` are unscaled). Returns the mean over (old-class samples x k), 0 when
    the batch holds no old-class sample or there is no new class."""
    k = min(k, cosines.shape[1] - n_old)
    if k <= 0:
        return cosines.new_zeros(())
    ground_truth = cosines.gather(1, targets[:, None])
    hardest_new = cosines[:, n_old:].topk(k, dim=1).values
    hinge = (margin - ground_truth + hardest_new).clamp_min(0.0)
    old = (targets < n_old).to(cosines.dtype)[:, None]
    return (hinge * old).sum() / (old.sum() * k).clamp_min(1.0)


def imprinted_weights(
    features: torch.Tensor, classes: torch.Tensor, norm: torch.Tensor | float, fallback: torch.Tensor
) -> torch.Tensor:
    """Weight imprinting as in LUCIR's code: row c = ``normalize(mean_i normalize(f_i))`` over
    the images of class c, times ``norm`` (the mean norm of the old rows). ``classes`` holds
    0..n-1, ``fallback`` (n, D) gives the rows of classes without an image."""
    rows = normalised_class_means(features, classes, fallback.shape[0]) * norm
    return torch.where(rows.isnan(), fallback.to(rows), rows)


# ----- helpers for the class-balanced finetuning -----------------------------------------------
@contextlib.contextmanager
def trainable(param: torch.nn.Parameter) -> Iterator[None]:
    """Let a frozen parameter train inside the block."""
    saved = param.requires_grad
    param.requires_grad_(True)
    try:
        yield
    finally:
        param.requires_grad_(saved)


class BalancedFinetune(FitHooks):
    """The hooks ``engine.fit`` needs for LUCIR's class-balanced finetuning: the class rows
    (old and new) as the only parameters, CE + margin ranking as the loss, and the backbone in
    eval mode in every epoch (fixed batch-norm statistics, the original's ``fix_bn``)."""

    def __init__(self, method: "LUCIR") -> None:
        self.method = method

    def train_mode(self, ctx: Context, model: torch.nn.Module) -> None:
        model.train()
        ctx.model.backbone.eval()

    def param_groups(self, ctx: Context) -> list[dict[str, Any]]:
        head = _cosine_head(ctx)
        return [{"params": [head.weight_old, head.weight_new]}]

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        ce, mr = self.method.classification_terms(ctx, batch, out["features"])
        return {"ce": ce, "margin_ranking": self.method.cfg.mr_weight * mr}


def _cosine_head(ctx: Context) -> SplitCosineLinear:
    return head_of(ctx, SplitCosineLinear, "LUCIR")


# ----- the method ------------------------------------------------------------------------------
@register("lucir")
class LUCIR(WithClassMeans):
    description = (
        "LUCIR: cosine classifier, imprinting, less-forget constraint, margin ranking, "
        "optional class-balanced finetuning (CNN + NME)"
    )
    Config = LUCIRConfig
    cfg: LUCIRConfig
    needs_teacher = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.cfg.cbf and not self.run_config.memory.enabled:
            raise UserError("config key 'lucir.cbf': class-balanced finetuning needs an exemplar memory "
                            "(set memory.total or memory.per_class)")

    # ----- model -------------------------------------------------------------------------------
    def build_model(self, in_channels: int, image_size: int) -> IncrementalNet:
        m = self.run_config.model
        return build_model(
            m.backbone, in_channels=in_channels, image_size=image_size, width=m.width,
            last_relu=False, head="cosine",
        )  # fmt: skip

    # ----- hooks -------------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        super().before_state(ctx)  # the head grows (old rows frozen)
        if ctx.state.index == 0:
            return
        ctx.record.results["lambda"] = self.less_forget_weight(ctx)
        if self.cfg.imprint:
            self.imprint(ctx)

    def imprint(self, ctx: Context) -> None:
        """Set the new rows from the new classes' training images under the model as it is
        before this state's training (the previous model)."""
        head = _cosine_head(ctx)
        train = ctx.state.train
        features = ctx.engine.train_features(ctx.model, train)
        classes = ctx.scenario.train_pos[train] - ctx.state.new.start
        norm = head.weight_old.detach().norm(dim=1).mean().cpu()
        rows = imprinted_weights(features, classes, norm, head.weight_new.detach().cpu())
        with torch.no_grad():
            head.weight_new.copy_(rows)

    def param_groups(self, ctx: Context) -> list[dict[str, Any]]:
        """Everything but the frozen old-class rows (backbone, new rows, sigma)."""
        frozen = _cosine_head(ctx).weight_old
        return [{"params": [p for p in ctx.model.parameters() if p is not frozen and p.requires_grad]}]

    def classification_terms(
        self, ctx: Context, batch: Batch, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy on ``sigma * cos``, margin ranking loss on the unscaled cosines)."""
        head = _cosine_head(ctx)
        cosines = head.cosine(features)
        ce = F.cross_entropy(head.sigma * cosines, batch.y)
        mr = margin_ranking_loss(cosines, batch.y, ctx.state.n_old, self.cfg.top_k, self.cfg.margin)
        return ce, mr

    def less_forget_weight(self, ctx: Context) -> float:
        """The state's ``lambda`` (Eq. 7 with the adaptive weight; see :func:`less_forget_weight`)."""
        return less_forget_weight(self.cfg.lambda_base, ctx.state.n_old, ctx.state.n_new, self.cfg.adaptive_lambda)

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        """State 0: cross-entropy on ``sigma * cos``. Later: that, ``lambda * L_lf`` against the
        previous model's features and ``mr_weight * L_mr``."""
        if batch.teacher is None:
            return {"ce": F.cross_entropy(out["logits"], batch.y)}
        ce, mr = self.classification_terms(ctx, batch, out["features"])
        lf = less_forget_loss(out["features"], batch.teacher["features"])
        return {"ce": ce, "less_forget": self.less_forget_weight(ctx) * lf, "margin_ranking": self.cfg.mr_weight * mr}

    def class_logits(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sigma * cos``, what the cross-entropy term reads."""
        return out["logits"]

    def after_state(self, ctx: Context) -> None:
        if self.cfg.cbf and ctx.state.index > 0:
            self.balanced_finetune(ctx)
        ctx.record.results["sigma"] = float(_cosine_head(ctx).sigma.detach())
        self.update_class_means(ctx)

    def balanced_finetune(self, ctx: Context) -> None:
        """Class-balanced finetuning of the class rows on the exemplar memory (which the runner
        has already updated with the new classes' exemplars), through ``engine.fit``."""
        indices = ctx.memory.indices(ctx.state.seen)
        schedule = ScheduleConfig(type="multistep", milestones=self.cfg.cbf_milestones, gamma=0.1)
        head = _cosine_head(ctx)
        frozen_backbone, rows = frozen(ctx.model.backbone.parameters()), trainable(head.weight_old)
        with frozen_backbone, rows:
            spec = ctx.fit.replace(epochs=self.cfg.cbf_epochs, lr=self.cfg.cbf_lr, schedule=schedule)
            fit = ctx.engine.fit(ctx, BalancedFinetune(self), indices, spec,
                                 desc=f"state {ctx.state.index + 1} balanced finetuning", stage="balanced finetuning")
        ctx.record.results["cbf"] = stage_record(indices, fit)
