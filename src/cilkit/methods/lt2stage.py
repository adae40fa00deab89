"""LT-CIL's two-stage rebalancing on a base method (Liu et al., "Long-Tailed Class Incremental
Learning", ECCV 2022), checked against the authors' code (xialeiliu/Long-Tailed-CIL, a FACIL
fork: ``approach/lucir_2stage.py``, ``eeil_2stage.py``, ``podnet_2stage.py``, ``LAS_utils.py``,
``datasets/data_loader.py``, ``scripts/script_cifar100_no_gridsearch.sh``).

- **Stage 1** is the base method (``lt2stage.base``: ``lucir``, ``eeil``, ``podnet``, the
  paper's three, or ``finetune``, the baseline) unchanged: its model, hooks, teacher, memory and
  its own extra stages (EEIL's balanced finetuning, LUCIR's ``cbf``, PODNet's ``finetune``), all
  forwarded (:class:`~cilkit.methods.base.BuildsOn`). The base's options stay under its own name.
- **Stage 2**, at the end of every state (state 0 included, as all three files run it for every
  task), after the base's ``after_state`` and the memory update (the authors collect the
  exemplars between the two stages): the representation frozen (no gradient, batch-norm in eval
  mode: the authors' ``self.model.model.eval()``), the classifier and a **learnable weight
  scaling** (LWS, ``LearnableWeightScaling``: one scale per class, initialised to 1, multiplying
  the class's logit) are trained on the state's training set drawn by the **class-aware
  sampler** (``ClassAwareSampler``, see :func:`class_aware_order`), with cross-entropy on the
  scaled logits ``lws * z``.
- **Test scores**: the base's scores of the scaled logits (LUCIR: ``lws * sigma * cos``, the
  authors' ``lws(outputs)`` on the ``wsigma`` logits; PODNet: ``lws * eta * s_c``); the scales
  are the method's state (results.json ``lws``; checkpoints, for a resume); the variant ``no_lws``
  scores the same logits unscaled. The teacher of the
  next state and the exemplar selection see the model without the LWS, as the authors' ``ref_model``
  (a copy of the network, whose LWS modules live beside it).

Readings chosen (paper or code, and why):

- Loss: the authors' stage 2 (``criterion(..., stage2=True)`` in all three files) is plain
  cross-entropy; ``LAS_utils.py``'s label-aware smoothing and ``mixup_data`` are imported but never
  called. ``lt2stage.loss: ce`` (default) follows the code; ``las`` gives the label-aware smoothing
  (:func:`label_aware_smoothing`, with ``smooth_head``, ``smooth_tail``, ``shape``, ``power``; our
  defaults, as no script sets them); ``mixup_alpha > 0`` mixes the images of a batch
  (:func:`mixup_batch`, as ``mixup_data``; off by default, as in the code).
- What trains: the authors' stage-2 optimiser holds ``heads[-1]`` (the state's new classes; with
  LUCIR's and PODNet's cosine heads the shared scale ``sigma`` comes with it) and every LWS module
  (one per task, ``lws_models``, kept across tasks: old classes' scales keep training).
  ``lt2stage.classifier: new`` (default) does the same: the rows of the state's new classes (all in
  state 0) plus LUCIR's ``sigma`` / PODNet's ``eta``; the old rows of a linear head are restored
  after each step (an SGD step is elementwise, so this is the optimiser without them). ``all``
  trains every row (the authors' LUCIR without less-forget). For ``finetune``, which the authors
  give no two-stage file, the same rule applies.
- Training set: the new images plus the old exemplars that stage 1 trained on (the authors'
  ``trn_loader.dataset``; their ConcatDataset read after ``collect_exemplars`` mixes in the
  updated exemplar list, an artefact we do not copy).
- Schedule: the authors' ``adjust_learning_rate_stage_2``, a cosine from ``lr`` to 0 over the
  stage's epochs, stepped after each epoch (the engine's ``cosine``); the LWS group at ``lr /
  lws_lr_factor``. The authors' optimiser starts both groups at ``lr`` and divides the LWS group
  only from the second epoch on; we divide it from the first. Momentum and weight decay are the
  run's (the authors' ``self.momentum``, ``self.wd``, on both groups).
- Gradients: no element clamp in stage 2 (PODNet's ``clamp_grad`` is its stage 1's; the authors'
  stage 2 clips the global norm at ``--clipping 10000``, i.e. never): the run's
  ``train.clip_grad_norm`` applies if set.
- Mixup (when on) mixes the normalised, augmented images of the batch before the engine's forward
  (the engine's ``mix_inputs`` hook, as GDumb's CutMix), and the loss mixes the two targets' losses.
- Epochs: 30, the authors' ``self.stage2epoch``, for every base. ``eeil_2stage.py`` runs
  ``range(1)`` (one epoch; the 30-epoch loop commented out beside it, a debugging leftover by
  our reading); ``lt2stage.epochs=1`` gives it.
- ``lucir_2stage.py`` skips stage 1 when a task's training set holds at most 10 images per class;
  we always run both stages.
- An epoch of the sampler draws as many images as the training set holds (``num_samples``), its
  class cycle and per-class cycles carried over from epoch to epoch within the stage, as the
  authors' sampler object is. The authors' ``random.shuffle`` is a torch permutation here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from cilkit.common.seeding import seeded_generator
from cilkit.methods.base import Batch, BuildsOn, Context, FitHooks, LossTerms, Method, MethodConfig, frozen, stage_record
from cilkit.models import IncrementalLinear
from cilkit.settings.config import ScheduleConfig
from cilkit.settings.options import option
from cilkit.settings.registry import register_method as register

Shape = Literal["concave", "linear", "convex", "exp"]


class LT2StageConfig(MethodConfig):
    # every option is read in state 0 (stage 2 runs there too), after the training the state-0
    # cache keeps, which is the base's (LT2Stage.state0_like)
    base: Literal["lucir", "eeil", "podnet", "finetune"] = option(
        "lucir", help="stage 1, the base method unchanged (its options under its own name): the paper's LUCIR, EEIL, "
                      "PODNet, or fine-tuning")
    epochs: int = option(30, ge=0, help="stage-2 epochs (the authors' stage2epoch; 0: no stage 2)")
    lr: float | None = option(None, gt=0,
                              help="stage-2 starting lr, cosine to 0 (null: the state's train lr, the authors' self.lr)")
    lws_lr_factor: float = option(10.0, gt=0,
                                  help="the LWS scales train at lr / lws_lr_factor (the authors' --lr-factor 10)")
    num_samples_cls: int = option(4, ge=1,
                                  help="consecutive images of a class per visit of the class-aware sampler (theirs: 4)")
    classifier: Literal["new", "all"] = option(
        "new", help="new: the state's new class rows and the head's scale (the authors' heads[-1]); all: every row")
    loss: Literal["ce", "las"] = option(
        "ce", help="ce: cross-entropy (the authors' stage-2 criterion); las: label-aware smoothing")
    smooth_head: float = option(0.4, ge=0, le=1,
                                help="las: smoothing of the most frequent class (our default)")
    smooth_tail: float = option(0.1, ge=0, le=1,
                                help="las: smoothing of the rarest class (our default)")
    shape: Shape = option("concave", help="las: how smoothing goes from tail to head (LAS_utils' default)")
    power: float = option(2.0, gt=0, help="las with shape exp: the power (our default)")
    mixup_alpha: float = option(0.0, ge=0,
                                help="mixup of the stage-2 batches, lambda ~ Beta(a, a) (0: off, as the authors' code)")
    quick: ClassVar[dict[str, Any]] = {"lt2stage.epochs": 1}


# ----- the components, as pure functions ---------------------------------------------------------
def lws_logits(logits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``LearnableWeightScaling.forward``: every class's logit times its scale."""
    return logits * scales[: logits.shape[1]].to(logits)


def smoothing_per_class(counts: torch.Tensor, head: float, tail: float, shape: str, power: float) -> torch.Tensor:
    """``LabelAwareSmoothing.__init__``: per class the smoothing from its training count,
    ``tail`` for the rarest present class and ``head`` for the most frequent, along ``shape``
    (``r = (n - n_K) / (n_1 - n_K)``; concave ``t + (h - t) sin(r pi / 2)``, linear ``t + (h - t)
    r``, convex ``h + (h - t) sin(3 pi / 2 + r pi / 2)``, exp ``t + (h - t) r ** power``). ``n_1``,
    ``n_K`` are over classes with images; with all counts equal, ``r = 0`` (the code divides by 0)."""
    n = counts.double()
    present = n[n > 0]
    lo, hi = (present.min(), present.max()) if present.numel() else (n.new_zeros(()), n.new_zeros(()))
    r = ((n - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.zeros_like(n)
    if shape == "concave":
        s = tail + (head - tail) * torch.sin(r * math.pi / 2)
    elif shape == "linear":
        s = tail + (head - tail) * r
    elif shape == "convex":
        s = head + (head - tail) * torch.sin(1.5 * math.pi + r * math.pi / 2)
    else:
        s = tail + (head - tail) * r.pow(power)
    return s.float()


def label_aware_smoothing(logits: torch.Tensor, targets: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """``LabelAwareSmoothing.forward``: batch mean of ``(1 - s_y) * nll + s_y * mean_j(-log p_j)``."""
    s = smooth.to(logits)[targets]
    logp = F.log_softmax(logits, dim=1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return ((1 - s) * nll - s * logp.mean(dim=1)).mean()


def mixup_batch(x: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``mixup_data``: ``(lam x + (1 - lam) x[perm], perm, lam)`` with ``lam ~ Beta(alpha, alpha)``
    (1 when ``alpha`` is 0). Both drawn from ``generator``: torch's Beta sampler takes no
    generator, so it runs on a forked CPU RNG seeded from ``generator`` (the global RNG untouched)."""
    lam = 1.0
    if alpha > 0:
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], perm, lam


class _Cycle:
    """A cycle over ``items`` in a fresh random order on every pass (``RandomCycleIter``), kept
    between calls: ``take(n)`` the next ``n``."""

    def __init__(self, items: torch.Tensor) -> None:
        self.items, self.rest = items, items[:0]

    def take(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        passes = max(0, -(-(n - self.rest.numel()) // max(self.items.numel(), 1)))
        stream = torch.cat([self.rest, *(self.items[torch.randperm(self.items.numel(), generator=generator)]
                                         for _ in range(passes))])
        self.rest = stream[n:]
        return stream[:n]


class ClassAwareSampler:
    """The authors' ``ClassAwareSampler`` over ``indices`` of classes ``classes`` (one per index):
    its state (where the class cycle and each class's cycle stand) lives across epochs."""

    def __init__(self, indices: torch.Tensor, classes: torch.Tensor, num_samples_cls: int) -> None:
        self.present = torch.unique(classes)
        self.k = num_samples_cls
        self.class_cycle = _Cycle(torch.arange(self.present.numel()))
        self.members = [_Cycle(indices[classes == c]) for c in self.present.tolist()]

    def epoch(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``n`` training indices: the class cycle visited ``ceil(n / k)`` times, each visit ``k``
        consecutive images of the class from its own cycle (the last visit cut at ``n``)."""
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        visits = self.class_cycle.take(-(-n // self.k), generator)
        counts = torch.bincount(visits, minlength=len(self.members)).tolist()
        streams = [cyc.take(self.k * c, generator) for cyc, c in zip(self.members, counts)]
        # the j-th visit of class c takes images j*k .. j*k+k-1 of the class's stream
        order = torch.argsort(visits, stable=True)
        starts = torch.cumsum(torch.tensor([0, *counts[:-1]]), 0)
        rank = torch.empty_like(visits)
        rank[order] = torch.arange(visits.numel()) - starts[visits[order]]
        offsets = torch.cumsum(torch.tensor([0, *(s.numel() for s in streams[:-1])]), 0)
        flat = torch.cat(streams)
        pos = (offsets[visits] + rank * self.k)[:, None] + torch.arange(self.k)
        return flat[pos].flatten()[:n]


def class_aware_order(sampler: ClassAwareSampler, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """One epoch of the class-aware sampler (``n`` draws)."""
    return sampler.epoch(n, generator)


# ----- stage 2 ------------------------------------------------------------------------------------
class Stage2(FitHooks):
    """Stage 2 as ``engine.fit`` hooks: the class-aware order, the classifier and the LWS scales
    as the only parameters, the backbone in eval mode, the loss on ``lws * logits``."""

    def __init__(self, ctx: Context, cfg: LT2StageConfig, scales: torch.Tensor, indices: torch.Tensor) -> None:
        self.cfg = cfg
        self.lws = torch.nn.Parameter(scales.to(ctx.device).clone())
        classes = ctx.scenario.train_pos[indices]
        self.sampler = ClassAwareSampler(indices, classes, cfg.num_samples_cls)
        counts = torch.bincount(classes, minlength=ctx.state.n_seen)
        self.smooth = smoothing_per_class(counts, cfg.smooth_head, cfg.smooth_tail, cfg.shape, cfg.power).to(ctx.device)
        self.mix_generator = seeded_generator(ctx.config.seed, "lt2stage-mixup", ctx.state.index)
        head = ctx.model.head
        self.head_params = [p for p in head.parameters() if p.requires_grad or cfg.classifier == "all"]
        # a linear head's old rows are one tensor with its new rows: restored after each step
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        if isinstance(head, IncrementalLinear) and cfg.classifier == "new" and ctx.state.n_old > 0:
            self.kept = [(p, p.detach()[: ctx.state.n_old].clone()) for p in (head.weight, head.bias)]

    def param_groups(self, ctx: Context) -> list[dict[str, Any]]:
        lr = self.cfg.lr if self.cfg.lr is not None else ctx.fit.lr
        return [{"params": self.head_params}, {"params": [self.lws], "lr": lr / self.cfg.lws_lr_factor}]

    def train_mode(self, ctx: Context, model: torch.nn.Module) -> None:
        model.eval()
        head: torch.nn.Module = ctx.model.head
        head.train()

    def batch_order(self, ctx: Context, indices: torch.Tensor, batch_size: int,
                    generator: torch.Generator | None) -> torch.Tensor:
        return class_aware_order(self.sampler, indices.numel(), generator)

    def after_step(self, ctx: Context) -> None:
        with torch.no_grad():
            for p, old in self.kept:
                p[: old.shape[0]].copy_(old)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scaled = lws_logits(logits, self.lws)
        if self.cfg.loss == "las":
            return label_aware_smoothing(scaled, targets, self.smooth)
        return F.cross_entropy(scaled, targets)

    def mix_inputs(self, ctx: Context, batch: Batch) -> Batch:
        """With ``mixup_alpha > 0``, the batch mixed as ``mixup_data`` (``mixup_batch``); else unchanged."""
        if self.cfg.mixup_alpha <= 0 or batch.x.shape[0] == 0:
            return batch
        mixed, perm, lam = mixup_batch(batch.x, self.cfg.mixup_alpha, self.mix_generator)
        return dataclasses.replace(batch, x=mixed, y_partner=batch.y[perm], lam=lam)

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        """The criterion on the LWS-scaled logits; on a mixed batch the authors' ``mixup_criterion``,
        ``lam * L(y) + (1 - lam) * L(y_partner)``."""
        logits = out["logits"]
        if batch.y_partner is None:
            return {self.cfg.loss: self.criterion(logits, batch.y)}
        return {self.cfg.loss: batch.lam * self.criterion(logits, batch.y)
                + (1 - batch.lam) * self.criterion(logits, batch.y_partner)}


# ----- the method ---------------------------------------------------------------------------------
@register("lt2stage")
class LT2Stage(BuildsOn):
    """The base method, then stage 2 at the end of every state; scores read the LWS scales."""

    description = ("LT-CIL two-stage: the base method (LUCIR, EEIL, PODNet, fine-tuning), then the classifier and a "
                   "learnable weight scaling retrained on a class-balanced draw with the representation frozen")
    Config = LT2StageConfig
    cfg: LT2StageConfig

    def __init__(self, config: Any, options: MethodConfig | None = None) -> None:
        super().__init__(config, options)  # the base the options name, with its own options
        self.lws = torch.ones(0)  # one scale per seen class (CPU), after the latest stage 2

    def state0_like(self) -> type[Method]:
        """State 0 trains as the base's (stage 2 comes after it, outside the cached training)."""
        return type(self.base)

    def after_state(self, ctx: Context) -> None:
        self.base.after_state(ctx)
        n_seen = ctx.state.n_seen
        scales = torch.cat([self.lws[:n_seen], torch.ones(max(0, n_seen - self.lws.numel()))])
        assert ctx.trained is not None and ctx.trained.rounds
        indices = ctx.trained.rounds[-1]
        if self.cfg.epochs > 0 and indices.numel():
            scales = self.stage2(ctx, scales, indices)
        self.lws = scales
        ctx.record.results["lws"] = [round(float(s), 6) for s in scales]

    def stage2(self, ctx: Context, scales: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        hooks = Stage2(ctx, self.cfg, scales, indices)
        head_ids = {id(p) for p in ctx.model.head.parameters()}
        rest = [p for p in ctx.model.parameters() if id(p) not in head_ids]
        saved = [p.requires_grad for p in hooks.head_params]
        spec = ctx.fit.replace(epochs=self.cfg.epochs, lr=self.cfg.lr if self.cfg.lr is not None else ctx.fit.lr,
                               schedule=ScheduleConfig(type="cosine"), clamp_grad=None)
        try:
            for p in hooks.head_params:
                p.requires_grad_(True)
            with frozen(rest):
                fit = ctx.engine.fit(ctx, hooks, indices, spec, desc=f"state {ctx.state.index + 1} lt2stage stage 2",
                                     stage="lt2stage", generator=seeded_generator(ctx.config.seed, "lt2stage",
                                                                                   ctx.state.index))
        finally:
            for p, flag in zip(hooks.head_params, saved):
                p.requires_grad_(flag)
        ctx.record.results["stage2"] = stage_record(indices, fit)
        return hooks.lws.detach().cpu()

    def _scaled(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**out, "logits": lws_logits(out["logits"], self.lws)} if self.lws.numel() else out

    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base's scores of the LWS-scaled logits."""
        return self.base.predict(ctx, self._scaled(out))

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.base.extra_scores(ctx, self._scaled(out)), "no_lws": self.base.predict(ctx, out)}

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "lws": self.lws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.lws = state["lws"]
