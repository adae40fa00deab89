"""SS-IL, "SS-IL: Separated Softmax for Incremental Learning" (Ahn, Kwak, Lim, Bang, Kim and
Moon, ICCV 2021).

Written from the paper (Sec. 4: the separated softmax, the task-wise distillation and the
ratio-preserving mini-batches) and checked line by line against the authors' code
(hongjoon0805/SS-IL-Official: ``trainer/ssil.py``, ``trainer/trainer_factory.py``,
``main.py``, ``arguments.py``, ``data_handler/incremental_loader.py``). The equation numbers
below were not checked against the PDF; the formulas are the code's.

- State 0 trains like fine-tuning: cross-entropy over all the state's classes, the default
  shuffled batches, the run's learning rate; the state-0 model is fine-tuning's, bit for bit
  (``tests/test_ssil.py``). Every option is unread in state 0 (declared ``state0=False``): SS-IL
  runs that differ only in them share one state-0 cache entry, and SS-IL declares its state 0
  fine-tuning's (``state0_like``), so it shares fine-tuning's entries too
  (``tests/test_state0_sharing.py`` trains both to check it).
- Separated softmax (``L_CE-SS``, :func:`separated_softmax_ce`), states >= 1: an image of a new
  class is scored by a softmax over the new classes' logits only, a replayed image of an old
  class by a softmax over the old classes' logits only; the cross-entropies are summed over the
  batch and divided by the batch size (new + replayed images), as the original's
  ``CrossEntropyLoss(reduction='sum')`` / ``(batch_size + replay_size)``. Which softmax an image
  gets is decided by its label (the original by its position in the concatenated batch: the
  same images, since the memory holds old classes only).
- Task-wise distillation (``L_TKD``, :func:`task_wise_kd`), states >= 1: for every past task
  ``t`` (the classes one earlier state added), ``T^2 * KL(softmax(z*_t / T) || softmax(z_t / T))``
  between the frozen previous model's and the current model's logits of that task only,
  averaged over the whole batch (new and replayed images: the original distils ``data``, the
  concatenation), summed over the tasks. ``T = 2`` and the ``T^2`` factor are the original's
  (``T=2``, ``kl_div(..., reduction='batchmean') * (T**2)``). Reading: the KL itself (the value
  the original logs), not the soft cross-entropy of :func:`~cilkit.methods.base.distillation_kl`;
  they differ by the teacher's entropy, a constant, so the gradients are the same.
- Total: ``L_CE-SS + kd_weight * L_TKD``, ``kd_weight = 1`` (the original adds them unweighted).
- Ratio-preserving batches (``batch_order``): every full batch holds ``replay_per_batch``
  replayed exemplars beside the new images (:func:`cilkit.training.engine.replay_order`). The original
  draws 128 new images (``--batch-size``) and 32 exemplars (``--replay-batch-size``) per step, a
  batch of 160; cilkit's ``train.batch_size`` is the whole batch, so the default is
  ``batch_size // 5`` (32 of 160; set ``train.batch_size: 160`` and ``ssil.replay_per_batch: 32``
  for the original's). Differences kept: the original drops the last incomplete batch of new
  images (``drop_last``), cilkit trains it (without replay); the original's exemplar loader
  shuffles many copies of the memory, cilkit cycles through shuffled passes (every exemplar once
  before any repeats).
- Learning rate (``lr_by_state``): the original's ``main.py`` trains state ``t`` (0-based) at
  ``lr / (t + 1)`` for ``ssil`` (and ``ft``); on by default, set as the state's fit
  (``fit_spec``), so the run's schedule scales it as usual.
- Memory: the original keeps a fixed total (``--memory-budget``), class-balanced (``ceil(K /
  seen)`` per class, then the largest classes give one back until the total fits) and picks
  each class's first images in the data's order: no herding, an arbitrary (random-like) choice.
  Use ``memory.total`` with ``memory.selection: random`` to match. The classifier is the plain
  linear layer with its bias (``nn.Linear`` in the original's ResNet-18), cilkit's default
  head. Test scores are the logits over all seen classes (one softmax), as the original evaluates.

Per state >= 1, ``results.json`` records under ``ssil``: ``replay_share`` (replayed images /
images trained on), ``replay_per_batch``, ``tasks_distilled`` and ``lr``; the loss terms
``separated_ce`` and ``task_kd`` (``kd_weight * L_TKD``) are in every epoch's line of
history.jsonl.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cilkit.training.engine import replay_order
from cilkit.common.errors import UserError
from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Batch, Context, FitSpec, LossTerms, Method, MethodConfig
from cilkit.methods.finetune import Finetune
from cilkit.settings.options import option


class SSILConfig(MethodConfig):
    # state 0 is fine-tuning: plain cross-entropy, shuffled batches, the run's lr (lr / 1)
    temperature: float = option(2.0, gt=0, state0=False,
                                help="T of the task-wise distillation (the original's T = 2)")
    kd_weight: float = option(1.0, ge=0, state0=False,
                              help="weight of L_TKD beside L_CE-SS (the original adds them unweighted)")
    replay_per_batch: int | None = option(
        None, ge=1, state0=False,
        help="replayed exemplars in every full batch of train.batch_size images; null: train.batch_size // 5 "
             "(the original's 32 replayed beside 128 new, a batch of 160)")
    lr_by_state: bool = option(
        True, state0=False,
        help="true: state b (0-based) trains at train.lr / (b + 1), as the original's main.py; false: train.lr")


# ----- the formulas ---------------------------------------------------------------------------
def separated_softmax_ce(logits: torch.Tensor, targets: torch.Tensor, n_old: int) -> torch.Tensor:
    """``L_CE-SS``: the cross-entropy of an image of a new class (target >= ``n_old``) under a
    softmax over the new classes' logits only, of an old class under a softmax over the old
    classes' logits only; summed over the batch, divided by its size. ``n_old = 0``: plain
    cross-entropy. The other group's logits are masked to -inf (no boolean indexing: no host
    synchronisation)."""
    old_column = torch.arange(logits.shape[1], device=logits.device) < n_old
    other_group = old_column[None, :] != (targets < n_old)[:, None]
    log_p = logits.masked_fill(other_group, float("-inf")).log_softmax(dim=1)
    return -log_p.gather(1, targets[:, None]).sum() / logits.shape[0]


def task_wise_kd(
    student: torch.Tensor, teacher: torch.Tensor, tasks: list[range], temperature: float
) -> torch.Tensor:
    """``L_TKD``: for every past task (the class range ``tasks[t]``),
    ``T^2 * KL(softmax(teacher_t / T) || softmax(student_t / T))`` averaged over the batch,
    summed over the tasks. ``teacher`` holds the previous model's logits of the old classes."""
    total = student.new_zeros(())
    for task in tasks:
        target = F.softmax(teacher[:, task.start:task.stop] / temperature, dim=1)
        log_q = F.log_softmax(student[:, task.start:task.stop] / temperature, dim=1)
        total = total + F.kl_div(log_q, target, reduction="batchmean") * temperature**2
    return total


# ----- the method ------------------------------------------------------------------------------
@register("ssil")
class SSIL(Method):
    description = ("SS-IL: separated softmax (new vs replayed old classes), task-wise distillation (T=2), "
                   "a fixed number of replayed exemplars in every batch")
    Config = SSILConfig
    cfg: SSILConfig
    needs_teacher = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        batch_size = self.run_config.train.batch_size
        self.replay_per_batch = self.cfg.replay_per_batch or max(1, batch_size // 5)
        if self.replay_per_batch >= batch_size:
            raise UserError(f"config key 'ssil.replay_per_batch' ({self.replay_per_batch}) must be below "
                            f"train.batch_size ({batch_size}): a batch needs new images too")

    def state0_like(self) -> type[Method]:
        """State 0 is fine-tuning (plain cross-entropy, shuffled batches, the run's lr)."""
        return Finetune

    def fit_spec(self, ctx: Context, spec: FitSpec) -> FitSpec:
        """The state's learning rate: ``train.lr / (b + 1)`` with ``lr_by_state``."""
        b = ctx.state.index
        return spec.replace(lr=spec.lr / (b + 1)) if b > 0 and self.cfg.lr_by_state else spec

    def batch_order(
        self, ctx: Context, indices: torch.Tensor, batch_size: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """From state 1 on: ``replay_per_batch`` exemplars in every full batch (state 0: a shuffle)."""
        if ctx.state.index == 0:
            return super().batch_order(ctx, indices, batch_size, generator)
        new = torch.isin(indices, ctx.state.train)
        return replay_order(indices[new], indices[~new], batch_size, self.replay_per_batch, generator)

    def _tasks(self, ctx: Context) -> list[range]:
        return [ctx.scenario.state_range(t) for t in range(ctx.state.index)]

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        logits = out["logits"]
        n_old = ctx.state.n_old
        if batch.teacher is None or n_old == 0:  # state 0: fine-tuning's cross-entropy
            return {"ce": F.cross_entropy(logits, batch.y)}
        ce = separated_softmax_ce(logits, batch.y, n_old)
        kd = task_wise_kd(logits, batch.teacher["logits"][:, :n_old], self._tasks(ctx), self.cfg.temperature)
        return {"separated_ce": ce, "task_kd": self.cfg.kd_weight * kd}

    def replayed_images(self, ctx: Context, n_new: int, n_replay: int) -> int:
        """How many of an epoch's images are replayed exemplars, for ``n_new`` new images and a
        memory of ``n_replay``: ``replay_per_batch`` in each full batch of
        :func:`~cilkit.training.engine.replay_order` (none without a full batch or a memory)."""
        full = n_new // (ctx.fit.batch_size - self.replay_per_batch)
        return full * self.replay_per_batch if full and n_replay else 0

    def after_state(self, ctx: Context) -> None:
        if ctx.state.index == 0 or ctx.trained is None or not ctx.trained.rounds:
            return
        indices = ctx.trained.rounds[-1]
        n_new = int(torch.isin(indices, ctx.state.train).sum())
        replayed = self.replayed_images(ctx, n_new, indices.numel() - n_new)
        ctx.record.results.update({
            "replay_share": replayed / (n_new + replayed),
            "replay_per_batch": self.replay_per_batch,
            "tasks_distilled": ctx.state.index,
            "lr": ctx.fit.lr,
        })  # fmt: skip
