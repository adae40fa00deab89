"""The method hook protocol: what the runner and the engine ask of a method, and what a method
may read (``docs/architecture.md`` walks through it).

This module sits below the engine and the runner: it imports neither (a test parses the
imports), so a method, the engine, the class statistics and the registry all read one
definition. The runner owns the one state loop (:mod:`cilkit.run.loop`) and the engine the one
training step (:mod:`cilkit.training.engine`). A method is one file that subclasses :class:`Method`,
overrides only the hooks it needs, and registers itself with ``@register_method("name")``. Per
state the runner calls, in this order::

    <teacher>                    a frozen copy of the model, ctx.teacher (when needs_teacher)
    before_state(ctx)            grow the head, imprint ...
    fit_spec(ctx, spec) -> spec  the state's optimiser, lr, epochs ... (default: the config's)
    rounds(ctx) -> int           training rounds in this state (default 1; active IL: one per
                                 annotation cycle); for each round r (ctx.round = r):
      begin_round(ctx)           the round's set-up that acts: annotate (active IL), compute the
                                 logit offsets of the round's training set (SIR) ...; also run on
                                 a state-0 cache hit, where nothing trains
      train_set(ctx) -> indices  what the round trains on (default: new data + memory): a pure query
      <engine.fit> with the method as its hooks (FitHooks):
        param_groups(ctx)        what the optimiser updates (default: all trainable parameters)
        teacher(ctx)             the model whose outputs the loss reads (batch.teacher): the
                                 engine runs its forward once per batch, without gradients
        mix_inputs(ctx, batch)   the batch to train on (default: itself; GDumb's CutMix)
        train_mode(ctx, model)   the mode each epoch trains in (default: model.train())
        begin_epoch / end_epoch  per-epoch state
        batch_order(ctx, indices, batch_size, generator)
        loss(ctx, batch, out)    named terms {name: tensor}; the engine sums them in order and
                                 logs each term's epoch mean
        before_step(ctx)         after the backward pass, before clipping and the optimiser step
                                 (DGR rewrites its classifier's gradients here)
        after_step(ctx)          after every optimiser step
    memory_candidates(ctx)       the new-class images the memory may store: a query
    memory_contents(ctx)         a memory the method keeps itself (GDumb), or None: a query
    <memory update>              herding / random over those candidates (or that memory)
    after_state(ctx)             extra stages and results (bias layer, class means ...)
    <class statistics>           ctx.statistics, which predict may read (IL2M)
    predict(ctx, out)            the method's test scores (default: the logits)
    extra_scores(ctx, out)       other score sets worth reporting (e.g. CNN beside NME)

A hook reads the :class:`Context`, which is frozen all the way down: what the state trained on
(:class:`TrainingRecord`) is recorded by the runner as a new record in a new context, never by
changing one a hook holds. A hook writes only ``ctx.record``, a :class:`StateRecord`: the
method's own results of the state (``results.json``: ``states[b][<method name>]``) and its own
files (``<run>/<method name>/state_XX.json``), which the run's store writes.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from pydantic import ConfigDict

from cilkit.settings.config import RunConfig, ScheduleConfig, TrainConfig
from cilkit.settings.options import StrictNumbers
from cilkit.data.base import Dataset, ImageSet, Rows, shuffled
from cilkit.cil.memory import Memory
from cilkit.models import IncrementalNet, build_model
from cilkit.cil.scenario import Scenario, State

__all__ = ["Batch", "Context", "EpochRecord", "FitHooks", "FitSpec", "LossTerms", "Method", "MethodConfig",
           "StateRecord", "Trainer", "TrainingRecord", "freeze"]

LossTerms = dict[str, torch.Tensor]  # a loss's named terms, summed by the engine in their order


class MethodConfig(StrictNumbers):
    """A method's own hyperparameters; subclass it in the method's file. A number option takes
    no boolean, infinity or NaN (:class:`~cilkit.settings.options.StrictNumbers`)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Batch:
    x: torch.Tensor  # normalised images on the device
    y: torch.Tensor  # class positions (0..n_seen-1) on the device
    idx: torch.Tensor  # indices into the training set
    # the outputs of the fit's teacher on ``x`` (float32, no gradient; with "stages" when the
    # hooks set needs_stages), run by the engine; None when the fit has no teacher
    teacher: dict[str, Any] | None = None
    # a mixed batch (FitHooks.mix_inputs; GDumb's CutMix): the labels of the images mixed into
    # ``x`` (class positions, on the device) and the share ``lam`` of ``x`` that is each
    # image's own (a host float); None / 1.0: not mixed
    y_partner: torch.Tensor | None = None
    lam: float = 1.0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a fit, as the run's history records it."""

    stage: str  # "train", or a method's own stage (e.g. "balanced finetuning")
    epoch: int  # 1-based, within the fit
    loss: float  # mean training loss over the epoch's images
    lr: float  # of the first parameter group, before the scheduler stepped
    images_per_second: float | None
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)  # each loss term's mean over the epoch's images


@dataclass(frozen=True)
class FitSpec:
    """Everything one fit trains with, the one road from the config to the optimiser: a state's
    fit is :meth:`of_state` of the run's ``train`` section (then ``Method.fit_spec``); a
    method's extra stage replaces what its own options set (``dataclasses.replace``)."""

    epochs: int
    lr: float
    schedule: ScheduleConfig
    optimizer: str = "sgd"  # sgd (with momentum) | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    clip_grad_norm: float | None = None  # the gradients' global L2 norm clipped to this after backward
    clamp_grad: float | None = None  # every gradient element clamped to [-c, c] after backward (PODNet)

    @classmethod
    def of_state(cls, train: TrainConfig, state: int) -> "FitSpec":
        """The fit of state ``state`` as the run's ``train`` section gives it."""
        return cls(epochs=train.epochs_of(state), lr=train.lr_of(state), schedule=train.schedule,
                   optimizer=train.optimizer, momentum=train.momentum, weight_decay=train.weight_decay,
                   batch_size=train.batch_size, clip_grad_norm=train.clip_grad_norm)

    def replace(self, **changes: Any) -> "FitSpec":
        return dataclasses.replace(self, **changes)


class Trainer(Protocol):
    """What a hook may ask of the engine (:class:`cilkit.training.engine.Engine`)."""

    def fit(self, ctx: "Context", hooks: "FitHooks", indices: torch.Tensor, spec: FitSpec, desc: str = ...,
            stage: str = ..., *, model: torch.nn.Module | None = ..., data: ImageSet | Rows | None = ...,
            generator: torch.Generator | None = ...) -> dict[str, Any]: ...

    def infer(self, model: torch.nn.Module, images: ImageSet, indices: torch.Tensor, want_features: bool = ...,
              hflip: bool = ...) -> dict[str, torch.Tensor]: ...

    def train_features(self, model: torch.nn.Module, indices: torch.Tensor, hflip: bool = ...) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainingRecord:
    """What a state trained on, recorded by the runner while it happened (each step a new record)."""

    old_exemplars: torch.Tensor  # the memory's old-class images as the state trained on them
    rounds: tuple[torch.Tensor, ...] = ()  # training-set indices of each round
    new_images: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    # ^ the new-class images the memory could store (method.memory_candidates), after training

    def with_round(self, indices: torch.Tensor) -> "TrainingRecord":
        return dataclasses.replace(self, rounds=(*self.rounds, indices))

    def with_new_images(self, indices: torch.Tensor) -> "TrainingRecord":
        return dataclasses.replace(self, new_images=indices)


@dataclass
class StateRecord:
    """What a method writes during a state, and nothing else does: kept by the runner until
    the state is recorded."""

    results: dict[str, Any] = field(default_factory=dict)  # results.json: states[b][<method name>]
    files: dict[str, Any] = field(default_factory=dict)  # <run>/<method name>/state_XX.json, if any


@dataclass(frozen=True)
class Context:
    """What a hook may read: the state, the data, the model, the teacher, the memory, the run
    settings; and ``record``, the one thing it writes. The runner makes a new context for each
    round and each step of the state (``dataclasses.replace``)."""

    config: RunConfig
    scenario: Scenario
    dataset: Dataset
    state: State
    model: IncrementalNet
    memory: Memory
    device: torch.device
    generator: torch.Generator  # this state's random numbers (CPU); seeded from the run seed
    mean: torch.Tensor
    std: torch.Tensor
    engine: Trainer
    fit: FitSpec  # the state's fit (the config's train section, then Method.fit_spec)
    record: StateRecord = field(default_factory=StateRecord)  # what the method writes
    teacher: IncrementalNet | None = None  # a frozen copy of the previous model (needs_teacher, state >= 1)
    round: int = 0  # the training round within the state (see Method.rounds)
    trained: TrainingRecord | None = None  # filled by the runner as the state trains
    statistics: dict[str, Any] | None = None  # the state's class statistics, before predict

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Original class ids -> class positions in the run's order."""
        return self.scenario.positions_on(labels.device)[labels]


class FitHooks(abc.ABC):
    """What the engine's fit asks of the thing it trains for: a method, or a stage of one
    (LUCIR's class-balanced finetuning). Override what differs from the defaults."""

    needs_stages: bool = False  # the loss reads out["stages"], the backbone's stage maps (PODNet)

    def param_groups(self, ctx: Context) -> list[dict[str, Any]]:
        """What the optimiser updates (default: every parameter of the model that requires a gradient)."""
        return [{"params": [p for p in ctx.model.parameters() if p.requires_grad]}]

    def teacher(self, ctx: Context) -> torch.nn.Module | None:
        """The frozen model whose outputs the loss reads as ``batch.teacher`` (default: none).
        A query: the engine runs its forward once per batch."""
        return None

    @abc.abstractmethod
    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        """The batch's training loss as named terms, each as it enters the sum (the interface's
        one required hook; ``Method`` gives ``{"ce": cross-entropy}``)."""

    def mix_inputs(self, ctx: Context, batch: Batch) -> Batch:
        """The batch to train on, given the one the data gave (on the device, normalised and
        augmented), before the teacher's and the model's forward: the place to mix inputs
        (GDumb's CutMix: ``x`` mixed, ``y_partner`` and ``lam`` set). Default: ``batch``
        itself (no copy). Draws come from a CPU generator of the hook's own; never a host sync."""
        return batch

    def train_mode(self, ctx: Context, model: torch.nn.Module) -> None:
        """Put ``model`` in the mode an epoch trains in, at the start of every epoch (default:
        ``model.train()``; LUCIR's balanced finetuning keeps the backbone in eval)."""
        model.train()

    def begin_epoch(self, ctx: Context, epoch: int) -> None:
        """Before epoch ``epoch`` (1-based) of the fit."""

    def before_step(self, ctx: Context) -> None:
        """After every backward pass, before the gradients are clipped or clamped (``FitSpec``)
        and the optimiser steps: the place to change the parameters' ``.grad`` in place (DGR
        reweights its classifier's gradients here); on the device, never a host sync."""

    def after_step(self, ctx: Context) -> None:
        """After every optimiser step (WA clips its classifier's weights here); in place on
        the parameters, never a host sync."""

    def end_epoch(self, ctx: Context, record: EpochRecord) -> None:
        """After an epoch, with what the history records of it."""

    def batch_order(
        self, ctx: Context, indices: torch.Tensor, batch_size: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The epoch's training images in the order they are used, cut into consecutive batches
        of ``batch_size`` (default: a shuffle drawn from the state's generator). Composing
        batches (a fixed ratio of replayed to new images in each) is a reordering:
        :func:`cilkit.training.engine.replay_order`."""
        return shuffled(indices, generator)


class Method(FitHooks):
    """Defaults: fine-tuning with cross-entropy on new data + memory, logits as scores."""

    name: ClassVar[str] = "method"
    description: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = False  # the runner keeps a frozen copy of the previous model (ctx.teacher)
    primary_scores: ClassVar[str] = "cnn"  # what `predict` reports (the top1 of results.json)
    classification_term: ClassVar[str] = "ce"  # the loss term that reads class_logits (what SIR replaces)
    # keep each state's test features and linear classifier in scores/state_XX.npz, what
    # `cilkit calibrate --with scail` reads (fine-tuning and the methods built on it)
    stores_features: ClassVar[bool] = False
    reference: ClassVar[bool] = False  # an upper bound or reference (joint): never bold in a paper table
    # what the method is defined with: True needs a memory, False keeps none (LwF: a run with a
    # memory is refused unless its options set allow_memory, and is labelled "with memory N"),
    # None either; checked where the config is validated (cilkit.settings.config.memory_refusal)
    needs_memory: ClassVar[bool | None] = None

    def __init__(self, config: RunConfig, options: MethodConfig | None = None) -> None:
        self.run_config = config
        self.cfg = options if options is not None else self.Config.model_validate(config.method_options(self.name))

    # ----- model -------------------------------------------------------------------------------
    def build_model(self, in_channels: int, image_size: int) -> IncrementalNet:
        m = self.run_config.model
        return build_model(m.backbone, in_channels=in_channels, image_size=image_size, width=m.width)

    def state0_like(self) -> "type[Method] | None":
        """A method whose state-0 training this one's is, number for number, under this run's
        config (SS-IL's, EEIL's: fine-tuning's): the state-0 cache then keys this run as that
        method's, so the two share entries. None (default): this method's own hooks and
        options key it. ``tests/test_state0_sharing.py`` trains both to check each claim."""
        return None

    def state0_signature(self) -> dict[str, Any]:
        """What else shapes this method's state-0 model, beyond what the state-0 cache key
        always holds (the method's options, the code of its state-0 hooks, the model's
        architecture, the data and training settings): e.g. a run setting read in state 0."""
        return {}

    def check_scenario(self, scenario: Scenario) -> None:
        """Refuse, with a ``UserError`` line naming the option, options that cannot work on
        this run's classes (more PODNet proxies than a class has images). Called by
        :func:`cilkit.run.setup.check_protocol` before anything is written; default: nothing to check."""
        return None

    # ----- hooks -------------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        ctx.model.add_classes(ctx.state.n_new)

    def fit_spec(self, ctx: Context, spec: FitSpec) -> FitSpec:
        """The state's fit (default: ``spec``, the run's ``train`` section for this state). A query."""
        return spec

    def teacher(self, ctx: Context) -> torch.nn.Module | None:
        """The previous model, which the runner froze for a method that ``needs_teacher``."""
        return ctx.teacher

    def rounds(self, ctx: Context) -> int:
        return 1

    def begin_round(self, ctx: Context) -> None:
        """Set up round ``ctx.round`` before its training set is asked for (also on a state-0
        cache hit, where nothing trains)."""
        return None

    def train_set(self, ctx: Context) -> torch.Tensor:
        """The round's training-set indices: a pure query (asked twice, the same answer, no
        state changed)."""
        return torch.cat([ctx.state.train, ctx.memory.indices(ctx.state.old)])

    def memory_candidates(self, ctx: Context) -> torch.Tensor:
        return ctx.state.train

    def memory_contents(self, ctx: Context) -> dict[int, torch.Tensor] | None:
        """The memory after this state, class position -> training indices, for a method that
        keeps a memory of its own (GDumb's sampler): the run's memory then holds exactly these
        images (``memory/state_XX.json``, the exemplars the next state and the class
        statistics read). None (default): the run's quotas and herding / random selection over
        ``memory_candidates``. A query."""
        return None

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        return {"ce": F.cross_entropy(self.class_logits(ctx, out), batch.y)}

    def class_logits(self, ctx: Context, out: dict[str, Any]) -> torch.Tensor:
        """The scores the classification term of the loss (``classification_term``) reads
        (default: the logits). A query."""
        return out["logits"]

    def after_state(self, ctx: Context) -> None:
        return None

    def statistics_warnings(self, ctx: Context, stats: dict[str, Any]) -> list[str]:
        """Warnings about this state's class statistics that matter to this method (logged)."""
        return []

    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["logits"]

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    # ----- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def freeze(model: IncrementalNet) -> IncrementalNet:
    """``model`` in eval mode with no parameter requiring a gradient (a teacher)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
