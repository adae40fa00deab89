"""BiC, bias correction (Wu et al., "Large Scale Incremental Learning", CVPR 2019).

Per state ``b >= 1`` (docs/methods.md, "bic"):

* **Validation split** (Sec. 4.1, Fig. 2; Sec. 6.1 "the ratio of train/validation split on the
  exemplars is 9:1"): in state ``b`` the same number ``v_b`` of images of every seen class form
  the validation set of stage 2, and they are never trained on. ``v_b = floor(val_ratio * m_b)``
  (at least 1, at most ``m_b``), ``m_b`` the smallest memory share of an old class in state
  ``b``: the original code's rule (``imagenet_main.py``: 10% of the old classes' exemplars, new
  classes matched to the same count). With 2000 exemplars and 10 classes per state it gives
  20, 10, 6, 5, 4, 3, 2, 2, 2 per class in states 2..10 (the original's "Val Samples" row).
  Where the images come from (the original code's, in which no validation image is ever
  trained on): when a class is new, a seeded random *hold-out* of ``v`` of its images is taken
  out of its training data, ``v`` = the largest size a bias stage will ask of it: ``v_1`` for
  the classes of state 0, ``v_b`` for those of state ``b >= 1``. (The original,
  ``utils_imagenet.prepare_validation``, holds ``v_1`` out of every class before state 0, so a
  later class loses ``v_1 - v_b`` images it never uses; we hold out only what is used.) The hold-out is
  never in ``train_set`` and never a memory candidate (``memory_candidates``), so herding or
  random selection cannot store it as a training exemplar. From then on it is the class's
  validation exemplars: state ``t`` uses its first ``v_t`` images (``v_t`` only shrinks). The
  validation images count in the memory budget, as in the paper: an old class with a memory
  share ``s`` trains on the first ``s - v_t`` of its exemplars (its herding priority prefix) and
  keeps ``v_t`` validation images, ``s`` in all, so the memory never holds more than ``K``.
  (``memory/state_XX.json`` lists each class's priority prefix of ``s`` images, whose last
  ``v`` slots BiC gives to the validation images; ``bic/state_XX.json`` lists those.)
  Consequence: BiC's state 0 trains without the hold-out, so its state-0 model is BiC's own,
  not the fine-tuning one (the state-0 cache keys it by the hold-out size).
* **Stage 1** (Sec. 4.1, Eq. 1-3): ``L = lambda * L_d + (1 - lambda) * L_c`` with
  ``lambda = n_old / n_seen``; ``L_c`` cross-entropy over all seen classes, ``L_d`` the
  cross-entropy between softmax(teacher old logits / T) and softmax(student old logits / T),
  ``T = 2`` (:func:`~cilkit.methods.base.distillation_kl`). The teacher is the previous model
  *with its bias correction*: the bias layer of state ``b-1`` rescales the teacher's logits of
  the classes new in ``b-1`` (README of the original: "classifier after correction is used for
  the distilling loss in the next incremental training"); the student's logits are raw.
* **Stage 2** (Sec. 4.2, Eq. 4-5): with everything else frozen, learn ``alpha`` (init 1) and
  ``beta`` (init 0) of ``o = [z_old, alpha * z_new + beta]`` by cross-entropy on the validation
  split, plus ``0.1 * beta^2 / 2`` (the original code's L2 on its ``gamma``, our ``beta``). The
  backbone and classifier are frozen, so the validation logits are computed once
  (``ctx.engine.infer``, eval transform: no augmentation) and the two scalars are optimised over
  those stored logits in shuffled mini-batches (SGD, momentum 0.9, 200 epochs, lr 0.1, x0.1 at
  epochs 60/120/160/180, batch = the run's ``train.batch_size`` unless ``bias_batch_size`` is
  set), as the original's schedule (``imagenet_main.py``: boundaries 30/60/80/90 x 2 bias epochs).

Weight decay: ``train.weight_decay`` throughout (the CIFAR-100 library setting), or with
``state_weight_decay: true`` the original's ``train.weight_decay * S / (b + 1)`` in state ``b``
of ``S`` (its ImageNet code; it also exempts batch-norm parameters, which we do not).

One bias layer per state. The test scores of state ``b`` (``predict``, reported as ``bic``) apply
only the layer of ``b`` to the classes new in ``b``; ``uncorrected`` holds the raw logits (the
accuracy "before bias correction"). ``alpha`` and ``beta`` of each state go to results.json under
``bic``, with ``val_per_class``, ``val_images``, ``train_exemplars`` (old-class exemplars stage
1 trains on) and ``memory_used`` (those + the old classes' validation images, at most ``K``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cilkit.settings.config import ScheduleConfig
from cilkit.data.base import Rows
from cilkit.common.errors import UserError
from cilkit.cil.memory import class_quotas
from cilkit.settings.registry import register_method as register
from cilkit.cil.budgets import validation_size
from cilkit.methods.base import Batch, Context, FitHooks, FitSpec, LossTerms, Method, MethodConfig, distillation_kl
from cilkit.models.bias import BiasLayer, correct_logits
from cilkit.cil.scenario import Scenario
from cilkit.settings.options import option
from cilkit.common.seeding import seeded_generator


class BiCConfig(MethodConfig):
    # distillation and the bias stage act from state 1 on (the hold-out, val_ratio, in state 0 too).
    # Stage 2 as the original code trains it (imagenet_main.py / resnet.py): 200 epochs, lr 0.1
    # decayed x0.1 at 60/120/160/180, momentum 0.9, L2 of 0.1 on beta (its "gamma").
    val_ratio: float = option(
        0.1, gt=0, lt=1,
        help="validation images per class = floor(val_ratio * m_b) (Sec. 6.1: a 9:1 train/validation split)")
    temperature: float = option(2.0, gt=0, state0=False, help="T of the distillation loss (Sec. 6.2: 2)")
    bias_epochs: int = option(200, ge=1, state0=False, help="stage-2 epochs")
    bias_lr: float = option(0.1, gt=0, state0=False, help="stage-2 learning rate")
    bias_milestones: list[int] = option(default_factory=lambda: [60, 120, 160, 180], state0=False,
                                        help="stage-2 epochs where the lr is multiplied by bias_gamma")
    bias_gamma: float = option(0.1, gt=0, state0=False, help="stage-2 lr decay factor")
    bias_momentum: float = option(0.9, ge=0, state0=False, help="stage-2 SGD momentum")
    beta_l2: float = option(0.1, ge=0, state0=False, help="L2 penalty on beta (the original's gamma)")
    bias_batch_size: int | None = option(None, ge=1, state0=False,
                                         help="stage-2 batch size; null: train.batch_size (the original's)")
    state_weight_decay: bool = option(
        False, help="weight decay train.weight_decay * S / (b + 1) in state b (the original's imagenet_model_fn: "
                    "1e-4 * nb_groups / (itera + 1)); false: train.weight_decay throughout")
    quick: ClassVar[dict[str, Any]] = {"bic.bias_epochs": 2}


class BiasStage(FitHooks):
    """BiC stage 2 (Sec. 4.2, Eq. 5) as the engine's fit over the validation logits:
    ``CE(layer(z), y) + beta_l2 * beta^2 / 2`` in ``alpha`` and ``beta`` only."""

    def __init__(self, layer: BiasLayer, beta_l2: float) -> None:
        self.layer, self.beta_l2 = layer, beta_l2

    def param_groups(self, ctx: Context) -> list[dict[str, Any]]:
        return [{"params": list(self.layer.parameters())}]

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        return {"ce": F.cross_entropy(out["logits"], batch.y), "beta_l2": self.beta_l2 * self.layer.beta**2 / 2}


def fit_bias_layer(ctx: Context, logits: torch.Tensor, labels: torch.Tensor, layer: BiasLayer, spec: FitSpec,
                   beta_l2: float, generator: torch.Generator) -> BiasLayer:
    """Fit ``layer`` on the (frozen) ``logits`` of images of original class ids ``labels``
    through the engine (:class:`BiasStage`): SGD over mini-batches shuffled from
    ``generator``, under ``spec`` (BiC's: lr x``gamma`` at each milestone epoch)."""
    rows = Rows(logits.detach().float(), labels)
    ctx.engine.fit(ctx, BiasStage(layer, beta_l2), torch.arange(len(rows)), spec,
                   desc=f"state {ctx.state.index + 1} bias layer", stage="bias layer",
                   model=layer, data=rows, generator=generator)
    return layer


def _pick(indices: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` of ``indices``, a seeded random choice."""
    return indices[torch.randperm(indices.numel(), generator=generator)[:k]]


def validation_sizes(ends: list[int], total: int | None, per_class: int | None, ratio: float) -> list[int]:
    """``v_b`` of every state ``b`` (0 for state 0, which has no bias stage), from the memory
    shares the budget gives the ``ends[b-1]`` old classes of state ``b``."""
    sizes = [0]
    for n_old in ends[:-1]:
        shares = class_quotas(total, per_class, n_old)
        sizes.append(validation_size(min(shares), ratio))
    return sizes


def holdout_sizes(ends: list[int], total: int | None, per_class: int | None, ratio: float) -> list[int]:
    """Images held out of the training data of each class new in state ``s``: the largest
    validation size the class will ever be asked for, ``v_1`` for state 0 (also in a run of one
    state, so that it depends on the config alone) and ``v_s`` for ``s >= 1``."""
    first = validation_size(min(class_quotas(total, per_class, ends[0])), ratio)
    return [first] + validation_sizes(ends, total, per_class, ratio)[1:]


@register("bic")
class BiC(Method):
    description = ("BiC: distillation from the bias-corrected previous model + a bias layer (alpha, beta) "
                   "fit on a balanced validation split")
    Config = BiCConfig
    cfg: BiCConfig
    needs_teacher = True
    primary_scores = "bic"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.run_config.memory.enabled:
            raise UserError("method 'bic' needs an exemplar memory (set memory.total or memory.per_class): "
                            "its validation split comes out of the exemplars")
        if self.run_config.memory.budget_bytes is not None:  # sized per state, after the hold-out is chosen
            raise UserError("method 'bic' holds its validation images out in advance, sized from memory.total or "
                            "memory.per_class: memory.budget_bytes cannot size them; run it with one of those")
        self.bias: dict[int, tuple[float, float]] = {}  # state -> (alpha, beta), states >= 1
        self.holdout: dict[int, torch.Tensor] = {}  # class position -> its held-out images
        self.val: dict[int, torch.Tensor] = {}  # state -> validation indices (old classes first)
        self.val_per_class: dict[int, int] = {}

    def _holdout_sizes(self, ends: list[int]) -> list[int]:
        mem = self.run_config.memory
        return holdout_sizes(ends, mem.total, mem.per_class, self.cfg.val_ratio)

    def state0_signature(self) -> dict[str, Any]:
        sig = super().state0_signature()
        sc = self.run_config.scenario
        if self.cfg.state_weight_decay:  # state 0's weight decay depends on the number of states
            sig["state_weight_decay"] = {"states": sc.states, "increment": sc.increment}
        # state 0 trains without its classes' validation hold-out, of v_1 images each
        sig["bic_holdout"] = self._holdout_sizes([sc.initial])[0]
        return sig

    def fit_spec(self, ctx: Context, spec: FitSpec) -> FitSpec:
        """With ``state_weight_decay``: the original's weight decay of state b,
        ``train.weight_decay * states / (b + 1)``."""
        if not self.cfg.state_weight_decay:
            return spec
        return spec.replace(weight_decay=spec.weight_decay * ctx.scenario.num_states / (ctx.state.index + 1))

    # ----- validation hold-out -----------------------------------------------------------------
    def begin_round(self, ctx: Context) -> None:
        """Draw the new classes' hold-out and the state's validation split (both once; the
        split reads the memory as the state starts)."""
        self._draw_holdout(ctx)
        b = ctx.state.index
        if b > 0 and b not in self.val:
            self.val[b], self.val_per_class[b] = self._draw_split(ctx)

    def new_class_holdout(self, ctx: Context) -> torch.Tensor:
        """The held-out images of this state's new classes (drawn by :meth:`begin_round`)."""
        parts = [self.holdout[c] for c in ctx.state.new]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _draw_holdout(self, ctx: Context) -> None:
        """Hold out images of the new classes, seeded random (from the run seed and the state),
        when they are new."""
        st = ctx.state
        if any(c not in self.holdout for c in st.new):
            h = self._holdout_sizes(ctx.scenario.ends)[st.index]
            gen = seeded_generator(ctx.config.seed, "bic-holdout", st.index)
            pos = ctx.scenario.train_pos[st.train]
            for c in st.new:
                images = st.train[pos == c]
                if images.numel() <= h:
                    raise UserError(f"method 'bic': class {ctx.scenario.order[c]} has {images.numel()} training "
                                    f"images, too few to hold out {h} for validation (lower bic.val_ratio)")
                self.holdout[c] = _pick(images, h, gen)

    def _new_training_images(self, ctx: Context) -> torch.Tensor:
        train = ctx.state.train
        return train[~torch.isin(train, self.new_class_holdout(ctx))]

    def memory_candidates(self, ctx: Context) -> torch.Tensor:
        """The new classes' images minus their validation hold-out."""
        return self._new_training_images(ctx)

    def validation_split(self, ctx: Context) -> torch.Tensor:
        """The state's validation indices (drawn by :meth:`begin_round`): the first ``v``
        held-out images of every old class, then of every new class."""
        return self.val[ctx.state.index]

    def _draw_split(self, ctx: Context) -> tuple[torch.Tensor, int]:
        st = ctx.state
        shares = {c: ctx.memory.of_class(c).numel() for c in st.old}
        empty = [c for c, n in shares.items() if n == 0]
        if empty:
            raise UserError(f"method 'bic': old class {ctx.scenario.order[empty[0]]} has no exemplar in state "
                            f"{st.index + 1}, so no room for its validation images; raise memory.total / "
                            "memory.per_class")
        v = validation_size(min(shares.values()), self.cfg.val_ratio)
        return torch.cat([self.holdout[c][:v] for c in st.seen]), v

    def old_exemplars(self, ctx: Context) -> torch.Tensor:
        """The exemplars stage 1 trains on: of each old class's memory share ``s``, the first
        ``s - v`` (the other ``v`` slots hold its validation images)."""
        v = self.val_per_class[ctx.state.index]
        parts = [ctx.memory.of_class(c) for c in ctx.state.old]
        parts = [p[: max(0, p.numel() - v)] for p in parts]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def train_set(self, ctx: Context) -> torch.Tensor:
        """Stage 1 trains on the new images minus their hold-out, plus the old classes'
        exemplars minus the validation slots: never on a validation image."""
        new = self._new_training_images(ctx)
        if ctx.state.index == 0:
            return new
        return torch.cat([new, self.old_exemplars(ctx)])

    # ----- stage 1 -----------------------------------------------------------------------------
    def corrected(self, logits: torch.Tensor, state: int, scenario: Scenario) -> torch.Tensor:
        """``logits`` with the bias layer of ``state`` applied to that state's new classes
        (unchanged for state 0 or a state without a layer)."""
        if state not in self.bias:
            return logits
        alpha, beta = self.bias[state]
        cols = scenario.state_range(state)
        return correct_logits(logits, cols.start, cols.stop, alpha, beta)

    def teacher_logits(self, ctx: Context, batch: Batch) -> torch.Tensor:
        """The previous model's logits (old classes) on the batch with the previous state's
        bias correction."""
        assert batch.teacher is not None
        return self.corrected(batch.teacher["logits"], ctx.state.index - 1, ctx.scenario)

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        """Eq. 3: ``lambda * L_d + (1 - lambda) * L_c``, ``lambda = n_old / n_seen``."""
        logits = out["logits"]
        ce = F.cross_entropy(logits, batch.y)
        n_old = ctx.state.n_old
        if batch.teacher is None or n_old == 0:
            return {"ce": ce}
        lam = n_old / ctx.state.n_seen
        kd = distillation_kl(logits[:, :n_old], self.teacher_logits(ctx, batch), self.cfg.temperature)
        return {"kd": lam * kd, "ce": (1 - lam) * ce}

    # ----- stage 2 -----------------------------------------------------------------------------
    def after_state(self, ctx: Context) -> None:
        b = ctx.state.index
        if b == 0:
            ctx.record.results.update({"alpha": 1.0, "beta": 0.0, "val_per_class": 0, "val_images": 0})
            self._write_record(ctx)
            return
        val = self.validation_split(ctx)
        out = ctx.engine.infer(ctx.model, ctx.dataset.train, val, want_features=False)
        logits, labels = out["logits"], ctx.targets(out["labels"])
        cfg = self.cfg
        spec = FitSpec(epochs=cfg.bias_epochs, lr=cfg.bias_lr, optimizer="sgd", momentum=cfg.bias_momentum,
                       weight_decay=0.0, batch_size=cfg.bias_batch_size or ctx.fit.batch_size,
                       schedule=ScheduleConfig(type="multistep", milestones=cfg.bias_milestones, gamma=cfg.bias_gamma))
        layer = fit_bias_layer(ctx, logits, out["labels"], BiasLayer(ctx.state.new.start, ctx.state.new.stop).to(ctx.device),
                               spec, cfg.beta_l2, seeded_generator(ctx.config.seed, "bic-bias", b))
        self.bias[b] = (float(layer.alpha.item()), float(layer.beta.item()))
        after = self.corrected(logits, b, ctx.scenario)
        n_train = self._trained_exemplars(ctx)
        ctx.record.results.update({
            "alpha": self.bias[b][0],
            "beta": self.bias[b][1],
            "val_per_class": self.val_per_class[b],
            "val_images": int(val.numel()),
            "train_exemplars": n_train,
            "memory_used": n_train + self.val_per_class[b] * ctx.state.n_old,
            "val_top1_uncorrected": 100.0 * (logits.argmax(1) == labels).double().mean().item(),
            "val_top1_corrected": 100.0 * (after.argmax(1) == labels).double().mean().item(),
        })
        self._write_record(ctx)

    @staticmethod
    def _trained_exemplars(ctx: Context) -> int:
        """The old-class exemplars stage 1 trained on (the memory has changed since)."""
        assert ctx.trained is not None and ctx.trained.rounds
        return int((ctx.scenario.train_pos[ctx.trained.rounds[-1]] < ctx.state.n_old).sum())

    def _write_record(self, ctx: Context) -> None:
        """``bic/state_XX.json``: the validation images of the state and every class's hold-out
        (original class id -> training-set indices)."""
        b, order = ctx.state.index, ctx.scenario.order
        val = self.val.get(b, torch.empty(0, dtype=torch.int64))
        pos = ctx.scenario.train_pos[val]
        ctx.record.files.update({
            "val_per_class": self.val_per_class.get(b, 0),
            "validation": {str(order[c]): val[pos == c].tolist() for c in ctx.state.seen if b > 0},
            "holdout": {str(order[c]): self.holdout[c].tolist() for c in ctx.state.seen if c in self.holdout},
        })

    # ----- scores ------------------------------------------------------------------------------
    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits with this state's bias layer only (on this state's new classes)."""
        return self.corrected(out["logits"], ctx.state.index, ctx.scenario)

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"uncorrected": out["logits"]}

    # ----- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "bias": {b: [a, c] for b, (a, c) in self.bias.items()},
            "holdout": {c: h.clone() for c, h in self.holdout.items()},
            "val": {b: v.clone() for b, v in self.val.items()},
            "val_per_class": dict(self.val_per_class),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bias = {int(b): (float(a), float(c)) for b, (a, c) in state["bias"].items()}
        self.holdout = {int(c): h.clone() for c, h in state["holdout"].items()}
        self.val = {int(b): v.clone() for b, v in state["val"].items()}
        self.val_per_class = {int(b): int(v) for b, v in state["val_per_class"].items()}
