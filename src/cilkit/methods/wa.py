"""WA, Weight Aligning (Zhao, Xiao, Gan, Zhang & Xia, "Maintaining Discrimination and Fairness in
Class Incremental Learning", CVPR 2020).

Written from the paper and checked against PyCIL (G-U-N/PyCIL, ``models/wa.py`` and
``utils/inc_net.py``, ``IncrementalNet.weight_align``) and against the WA post-processor of the
DER code base (Rhyssiyan/DER-ClassIL.pytorch, ``inclearn/models/align.py`` and
``inclearn/convnet/imbalance.py``, class ``WA``), the only public code read that clips weights.

Two phases per incremental state (new data + exemplars, as fine-tuning with memory):

1. Training (the paper's loss; its equation numbers are not cited here, the paper's text was not
   at hand when this was written): ``L = (1 - lambda) L_CE + lambda L_KD`` with
   ``lambda = n_old / n_seen`` (``lambda_kd: null``, the default), ``L_CE`` the cross-entropy over
   the seen classes and ``L_KD = mean_x sum_{k <= n_old} -softmax(o_hat / T)_k log softmax(o / T)_k``
   over the old classes' logits of the current (``o``) and the previous model (``o_hat``), T = 2,
   no ``T^2`` factor (:func:`cilkit.methods.base.distillation_kl`). PyCIL's code has used this
   form since 2023-02 (``kd_lambda = known / total``); before that it trained ``L_CE + 2 L_KD``:
   ``lambda_kd: 2`` gives ``L_CE + lambda_kd L_KD`` with a fixed weight. The readings differ
   materially (a 10-class step of CIFAR-100 B0 weighs CE by 0.1 at the last state in one, by 1
   in the other), so both are offered; the paper's is the default. State 0 (no teacher) is plain
   cross-entropy in both.
2. Weight Aligning after the state's training (Eq. 6-7): with ``W_old`` the classifier rows of the
   old classes and ``W_new`` those of the new ones, ``gamma = mean_i ||W_old,i|| / mean_j
   ||W_new,j||`` (L2 norms of the rows) and ``W_new <- gamma * W_new``. It runs in ``after_state``,
   after the memory update: herding reads features only, never the classifier, so its exemplars
   are those of PyCIL, which aligns before building the memory. (PyCIL aligns a second time in
   ``after_task``; the second gamma is 1 up to rounding, so it is left out.)

Weight clipping (the paper: the features after the last ReLU are non-negative,
so the classifier's weights are kept non-negative): after every optimiser step the classifier's
weights are clamped to ``>= 0``. PyCIL does not clip at all; the DER code clamps every classifier
parameter after each ``optimizer.step()`` in every task, the first included. ``clip:
always`` (default) follows the paper and the DER code; ``incremental`` clips from state 1 on;
``never`` is PyCIL. The clamp is the ``after_step`` hook of the engine's fit, after every
optimiser step, so the first forward pass sees the initial weights and the last step is
clamped too. (A clamp at the start of ``loss`` would come after the forward pass had already
used the unclipped weights, and would modify a tensor the graph saved for the backward pass.)

Bias: the paper's classifier has no bias (``o = W^T phi(x)``), and cilkit's ``IncrementalLinear``
has one. ``bias: false`` (default) keeps it at zero, out of the optimiser (so no weight decay
either), in every state: the logits are the paper's ``W phi(x)``. ``bias: true`` is PyCIL's
``SimpleLinear``: the bias is trained, neither aligned nor clipped (the DER code's post-processor
scales whole logits, so its bias, when it has one, is aligned and clipped too; not offered).

State 0 and the state-0 cache: with the defaults (no bias, clipping in state 0) WA's state-0
model is not fine-tuning's; with ``bias: true`` and ``clip: incremental`` (or ``never``) it is,
number for number (``tests/test_wa.py``), and WA then declares it (``state0_like``) and shares
fine-tuning's state-0 cache entries. WA runs also share entries between themselves when they
differ only in options state 0 never reads: ``temperature``, ``lambda_kd``, ``align``, and
whether ``clip`` is ``incremental`` or ``never``.

Per state >= 1, ``results.json`` records under ``wa``: ``lambda`` (of the KD term; null with a
fixed ``lambda_kd``), ``gamma`` (null when not aligned), the mean norms of the old and new rows
before aligning (``norm_old``, ``norm_new``) and ``min_weight``, the smallest classifier weight
after training (never negative when the state clipped). Scores: the logits.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Batch, Context, LossTerms, Method, MethodConfig, distillation_kl, head_of, teacher_old_logits
from cilkit.methods.finetune import Finetune
from cilkit.models import IncrementalLinear
from cilkit.settings.options import option


class WAConfig(MethodConfig):
    # distillation and aligning act from state 1 on; clip is read in state 0 (always clips there)
    temperature: float = option(2.0, gt=0, state0=False, help="T of the distillation (the paper and PyCIL: 2)")
    lambda_kd: float | None = option(
        None, ge=0, state0=False,
        help="null: the paper's (1 - lambda) CE + lambda KD with lambda = n_old / n_seen (PyCIL since 2023-02); "
             "a number w: CE + w KD with a fixed weight (PyCIL before: w = 2)")
    align: bool = option(True, state0=False,
                         help="Weight Aligning (Eq. 6-7) after each incremental state's training (b >= 1)")
    clip: Literal["always", "incremental", "never"] = option(
        "always", help="classifier weights >= 0 after every optimiser step: always (the paper, the DER code), "
                       "incremental (states b >= 1), never (PyCIL)")
    bias: bool = option(False, help="train the classifier's bias (PyCIL; neither aligned nor clipped); false: the "
                                    "paper's o = W^T phi(x), the bias held at 0 and out of the optimiser")


# ----- the formulas ---------------------------------------------------------------------------
def wa_loss(
    logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor | None, temperature: float,
    lambda_kd: float | None = None,
) -> LossTerms:
    """The training loss of one batch: ``logits`` over the seen classes, ``old_logits``
    the previous model's over the old ones (None in state 0: plain cross-entropy). With
    ``lambda_kd`` None, ``(1 - l) CE + l KD``, ``l = n_old / n_seen``; else ``CE + lambda_kd KD``."""
    ce = F.cross_entropy(logits, labels)
    if old_logits is None or old_logits.shape[1] == 0:
        return {"ce": ce}
    kd = distillation_kl(logits[:, : old_logits.shape[1]], old_logits, temperature)
    if lambda_kd is None:
        lam = kd_weight(old_logits.shape[1], logits.shape[1])
        return {"ce": (1.0 - lam) * ce, "kd": lam * kd}
    return {"ce": ce, "kd": lambda_kd * kd}


def kd_weight(n_old: int, n_seen: int) -> float:
    """The paper's ``lambda = n / (n + m)``: old classes over seen classes."""
    return n_old / n_seen


def aligned_weights(weight: torch.Tensor, n_old: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight Aligning (Eq. 6-7): ``(weight with its new rows times gamma, gamma)``, ``gamma`` the
    mean L2 norm of the first ``n_old`` rows over the mean norm of the others."""
    norms = weight.norm(dim=1)
    gamma = norms[:n_old].mean() / norms[n_old:].mean()
    return torch.cat([weight[:n_old], weight[n_old:] * gamma]), gamma


def align_new_rows(head: Any, n_old: int, align: bool) -> dict[str, Any]:
    """Weight Aligning of ``head``'s new rows in place when ``align`` (and they have a norm):
    the record of it, ``norm_old``, ``norm_new``, ``gamma`` (None when not aligned), as WA and
    MEMO store it in results.json."""
    weight = head.weight.detach()
    norms = weight.norm(dim=1)
    norm_new = norms[n_old:].mean()
    record: dict[str, Any] = {"norm_old": float(norms[:n_old].mean()), "norm_new": float(norm_new), "gamma": None}
    if align and float(norm_new) > 0:
        rows, gamma = aligned_weights(weight, n_old)
        with torch.no_grad():
            head.weight.copy_(rows)
        record["gamma"] = float(gamma)
    return record


# ----- the method ------------------------------------------------------------------------------
@register("wa")
class WA(Method):
    description = ("WA: cross-entropy + distillation on the old logits, weight clipping (classifier weights >= 0), "
                   "then Weight Aligning of the new classes' weight norms to the old ones'")
    Config = WAConfig
    cfg: WAConfig
    needs_teacher = True

    def state0_like(self) -> type[Method] | None:
        """With a trained bias and no clipping in state 0 (PyCIL's classifier), state 0 is
        fine-tuning's cross-entropy training."""
        return Finetune if self.cfg.bias and self.cfg.clip != "always" else None

    def _head(self, ctx: Context) -> IncrementalLinear:
        return head_of(ctx, IncrementalLinear, "WA")

    def _clips(self, ctx: Context) -> bool:
        return self.cfg.clip == "always" or (self.cfg.clip == "incremental" and ctx.state.index > 0)

    # ----- hooks -------------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        super().before_state(ctx)  # frozen teacher, then the head grows
        head = self._head(ctx)
        if not self.cfg.bias:  # the paper's o = W^T phi(x): no bias, in any state
            with torch.no_grad():
                head.bias.zero_()
            head.bias.requires_grad_(False)
        if ctx.state.index > 0 and self.cfg.lambda_kd is None:
            ctx.record.results["lambda"] = kd_weight(ctx.state.n_old, ctx.state.n_seen)
        elif ctx.state.index > 0:
            ctx.record.results["lambda"] = None

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        return wa_loss(out["logits"], batch.y, teacher_old_logits(ctx, batch), self.cfg.temperature,
                       self.cfg.lambda_kd)

    def after_step(self, ctx: Context) -> None:
        """Weight clipping: the classifier's weights clamped to ``>= 0`` after every step."""
        if self._clips(ctx):
            with torch.no_grad():
                self._head(ctx).weight.clamp_(min=0.0)

    def after_state(self, ctx: Context) -> None:
        if ctx.state.index == 0:
            return
        head = self._head(ctx)
        min_weight = float(head.weight.detach().min())  # before aligning: what the clipping left
        record = align_new_rows(head, ctx.state.n_old, self.cfg.align)
        ctx.record.results.update({**record, "min_weight": min_weight})
