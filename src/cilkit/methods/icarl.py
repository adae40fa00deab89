"""iCaRL (Rebuffi et al., CVPR 2017): herding memory, distillation, nearest-mean classifier.

Loss (``loss: bce``, the paper's Sec. 2.2 / Alg. 3 and its original code): sigmoid binary
cross-entropy over all seen classes, where the targets of the old classes are the previous
model's sigmoid outputs (distillation) and those of the new classes are one-hot labels
(:func:`icarl_bce`). ``loss: ce_kd`` is the variant of later libraries: cross-entropy + KD on
old logits at T.

Loss scale (``bce_reduction``), which the learning rate must match. The paper's Alg. 3 sums
the binary cross-entropies over the classes (and the samples); ``sum`` (default) sums over the
seen classes and averages over the batch. The original code (``main_cifar_100_theano.py``)
takes ``loss.mean()`` over the batch and the network's 100 output units and pairs it with lr
2.0 and momentum 0.9; ``mean`` divides by the run's number of classes to match that scale
(cilkit's head grows, so the original's outputs of not-yet-seen classes, trained toward 0,
are absent). With ``mean`` and lr 2.0 the per-class step is the original's; with ``sum`` the
same step is lr 2.0 / C (``configs/icarl-cifar100-b0-10.yaml`` uses ``mean`` and 2.0).

How fragile the loss is (measured, ``benchmarks/RESULTS.md``, "iCaRL's first state"): at
initialisation every sigmoid is near 0.5 and the loss sits on a plateau, ``C ln 2`` for ``C``
seen classes (``ln 2`` per class with ``mean``), where the gradient carries little class
information; SGD has to leave it. Cross-entropy leaves it faster: on Fashion-MNIST (classes
2 and 8, LeNet, lr 0.1, no momentum, 5 epochs, seeds 0-5) fine-tuning's first-epoch loss is
43-49% of its plateau, iCaRL's (``sum``) 47-90% (seeds 0-9), and with ``mean`` over the
run's 10 classes at the same lr (a 10x smaller step) 97-99%: the whole first epoch on the
plateau. Every one of those runs still reached 95.9-98.9% top-1 on the two classes after 5
epochs; a run that ends its first state near the plateau value (the issue's 0.68 ~ ln 2,
59.5% top-1) is an effective step too small for its loss scale (e.g. ``mean`` with a
cross-entropy learning rate, or no momentum where the original has 0.9), not a defect of the
formula. Pair the lr with the reduction. A state whose last epoch ends within 10% of its first
batch's loss is reported in the log as one that may have learned nothing (for every method).

Classification is nearest-mean-of-exemplars (Alg. 1): class means of L2-normalised features of
each class's exemplars (and of their horizontal flips when the dataset trains with flips, as
the original code does), re-normalised; a test image goes to the nearest mean. The CNN's own
(logit) accuracy is reported beside it as ``cnn``. Use ``memory.selection: herding``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Batch, Context, LossTerms, MethodConfig, distillation_kl, teacher_old_logits
from cilkit.methods.nme import WithClassMeans
from cilkit.settings.options import option


class ICaRLConfig(MethodConfig):
    loss: Literal["bce", "ce_kd"] = option(
        "bce", help="bce: the paper's sigmoid BCE with distillation targets; ce_kd: cross-entropy + KD")
    bce_reduction: Literal["sum", "mean"] = option(
        "sum", help="bce only: sum over the seen classes, mean over the batch (the paper's Alg. 3 sum, per image); "
                    "mean: the original code's mean over the batch and the run's classes")
    temperature: float = option(2.0, help="ce_kd only: the temperature of the distillation")


def icarl_bce(logits: torch.Tensor, target: torch.Tensor, divisor: int = 1) -> torch.Tensor:
    """iCaRL's classification + distillation loss (Alg. 3): sigmoid binary cross-entropy
    ``-sum_y [t_y log g_y + (1 - t_y) log(1 - g_y)]`` over the seen classes, averaged over the
    batch and divided by ``divisor`` (1: the paper's sum; the run's class count: the original
    code's mean over all output units)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / (logits.shape[0] * divisor)


def bce_divisor(reduction: str, n_classes: int) -> int:
    """1 for ``sum``; the run's number of classes ``n_classes`` for ``mean`` (the original
    code's output units)."""
    return 1 if reduction == "sum" else n_classes


def distilled_loss(
    logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor | None, loss: str, divisor: int,
    temperature: float, lambda_kd: float = 1.0,
) -> LossTerms:
    """iCaRL's loss (``loss="bce"``: :func:`icarl_bce` with the teacher's sigmoids as the old
    classes' targets, the one-hot labels as the new ones') or ``ce_kd``: cross-entropy plus
    ``lambda_kd`` times the softmax distillation of the old classes at ``temperature``.
    ``old_logits``: the teacher's logits of the old classes, None in state 0. LwF-MC shares it."""
    if loss == "bce":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        if old_logits is not None:
            target[:, : old_logits.shape[1]] = torch.sigmoid(old_logits)
        return {"bce": icarl_bce(logits, target, divisor)}
    terms = {"ce": F.cross_entropy(logits, labels)}
    if old_logits is not None:
        terms["kd"] = lambda_kd * distillation_kl(logits[:, : old_logits.shape[1]], old_logits, temperature)
    return terms


@register("icarl")
class ICaRL(WithClassMeans):
    description = ("iCaRL: herding memory, sigmoid-BCE distillation, nearest-mean-of-exemplars classifier (NME + CNN); "
                   "its BCE starts on a plateau (C ln 2), so match the lr to icarl.bce_reduction "
                   "(sum: CE-like lr; mean: the original's lr 2.0, momentum 0.9)")
    Config = ICaRLConfig
    cfg: ICaRLConfig
    needs_teacher = True
    primary_scores = "nme"

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        divisor = bce_divisor(self.cfg.bce_reduction, ctx.scenario.ends[-1])
        return distilled_loss(out["logits"], batch.y, teacher_old_logits(ctx, batch), self.cfg.loss, divisor,
                              self.cfg.temperature)

    def after_state(self, ctx: Context) -> None:
        self.update_class_means(ctx)

    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """NME scores (-inf for a class with no mean, i.e. no exemplar), see ``methods.nme``."""
        return self.nme(out)

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"cnn": out["logits"]}
