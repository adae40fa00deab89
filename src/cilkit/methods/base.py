"""The method hook protocol (``docs/architecture.md`` walks through it).

The runner owns the one state loop (:mod:`cilkit.run.loop`) and the engine the one training
loop (:mod:`cilkit.engine`). A method is one file that subclasses :class:`Method`, overrides
only the hooks it needs, and registers itself with ``@register_method("name")``
(:mod:`cilkit.registry`; the built-in methods import it as ``cilkit.methods.register``). Per
state the runner calls, in this order::

    before_state(ctx)            grow the head, keep a frozen teacher (ctx.record.teacher), imprint ...
    rounds(ctx) -> int           training rounds in this state (default 1; active IL: one per
                                 annotation cycle); for each round r (ctx.round = r):
      begin_round(ctx)           the round's set-up that acts: annotate (active IL), compute the
                                 logit offsets of the round's training set (SIR) ...; also run on
                                 a state-0 cache hit, where nothing trains
      train_set(ctx) -> indices  what the round trains on (default: new data + memory): a pure query
      <engine.fit> with the method as its hooks (see engine.FitHooks):
        param_groups(ctx)        what the optimiser updates (default: all trainable parameters)
        train_mode(ctx, model)   the mode each epoch trains in (default: model.train())
        begin_epoch / end_epoch  per-epoch state
        batch_order(ctx, indices, batch_size, generator)
                                 the epoch's order of images, cut into batches of batch_size
                                 (default: a seeded shuffle; a replay ratio per batch, SS-IL)
        loss(ctx, batch, out)    per batch (default: cross-entropy)
    memory_candidates(ctx)       the new-class images the memory may store (default: all of
                                 the state's training images; active IL: the annotated ones): a query
    memory_contents(ctx)         a memory the method keeps itself (GDumb), or None: a query
    <memory update>              herding / random over those candidates (or that memory)
    after_state(ctx)             extra stages and results (bias layer, class means ...)
    <class statistics>           ctx.statistics, which predict may read (IL2M)
    predict(ctx, out)            the method's test scores (default: the logits)
    extra_scores(ctx, out)       other score sets worth reporting (e.g. CNN beside NME)

The memory is updated before ``after_state``, because the stages that follow training (iCaRL
class means, LUCIR balanced finetuning) read it. What the state trained on is recorded by the
runner (:class:`TrainingRecord`, ``ctx.trained``) as it happens: the class statistics and any
hook that needs the past read that record, so no hook is ever called a second time to
reconstruct it.

A hook reads the :class:`Context` (frozen: a hook cannot replace what it holds) and writes only
to ``ctx.record``, a :class:`StateRecord`: the teacher, the method's own results of the state
(``results.json``: ``states[b][<method name>]``) and its own files (``<run>/<method name>/
state_XX.json``), which the run's store writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from cilkit.config import RunConfig
from cilkit.data.base import Dataset
from cilkit.engine import Batch, Engine, FitHooks
from cilkit.errors import UserError
from cilkit.memory import Memory
from cilkit.models import IncrementalLinear, IncrementalNet, build_model
from cilkit.scenario import Scenario, State

__all__ = ["Batch", "Context", "Method", "MethodConfig", "StateRecord", "TrainingRecord", "distillation_kl",
           "freeze", "head_of", "stage_record", "teacher_old_logits"]


class MethodConfig(BaseModel):
    """A method's own hyperparameters; subclass it in the method's file."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TrainingRecord:
    """What a state trained on, recorded by the runner while it happened."""

    old_exemplars: torch.Tensor  # the memory's old-class images as the state trained on them
    rounds: list[torch.Tensor] = field(default_factory=list)  # training-set indices of each round
    new_images: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    # ^ the new-class images the memory could store (method.memory_candidates), after training


@dataclass
class StateRecord:
    """What a method writes during a state, and nothing else does: kept by the runner until
    the state is recorded."""

    teacher: IncrementalNet | None = None  # a frozen copy of the previous model (before_state)
    results: dict[str, Any] = field(default_factory=dict)  # results.json: states[b][<method name>]
    files: dict[str, Any] = field(default_factory=dict)  # <run>/<method name>/state_XX.json, if any


@dataclass(frozen=True)
class Context:
    """What a hook may read: the state, the data, the model, the memory, the run settings; and
    ``record``, the one thing it writes. The runner makes a new context for each round
    (``dataclasses.replace``) and fills ``trained`` and ``statistics`` as the state goes."""

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
    engine: Engine
    record: StateRecord = field(default_factory=StateRecord)  # what the method writes
    round: int = 0  # the training round within the state (see Method.rounds)
    trained: TrainingRecord | None = None  # filled by the runner as the state trains
    statistics: dict[str, Any] | None = None  # the state's class statistics, before predict

    @property
    def teacher(self) -> IncrementalNet | None:
        """The frozen previous model a method kept in ``before_state`` (``needs_teacher``)."""
        return self.record.teacher

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Original class ids -> class positions in the run's order."""
        return self.scenario.positions_on(labels.device)[labels]


class Method(FitHooks):
    """Defaults: fine-tuning with cross-entropy on new data + memory, logits as scores."""

    name: ClassVar[str] = "method"
    description: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = False  # keep a frozen copy of the previous model
    primary_scores: ClassVar[str] = "cnn"  # what `predict` reports (the top1 of results.json)
    # options that state 0 never reads: left out of the state-0 cache key, so that runs which
    # differ only in them share one state-0 model (see cilkit.run.state0cache)
    state0_free_options: ClassVar[tuple[str, ...]] = ()
    # keep each state's test features and linear classifier in scores/state_XX.npz, what
    # `cilkit calibrate --with scail` reads (fine-tuning and the methods built on it)
    stores_features: ClassVar[bool] = False

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

    # ----- hooks -------------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        if self.needs_teacher and ctx.state.index > 0:
            ctx.record.teacher = freeze(copy.deepcopy(ctx.model))
        ctx.model.add_classes(ctx.state.n_new)

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

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(out["logits"], batch.y)

    def after_state(self, ctx: Context) -> None:
        return None

    # ----- the loss, decomposed (what SIR's ``base`` reads) ------------------------------------------
    def class_logits(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scores the classification term of the loss reads (default: the logits)."""
        return out["logits"]

    def regularisation_loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss besides its classification term (distillation ...; default: none)."""
        return out["logits"].new_zeros(())

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


HeadT = TypeVar("HeadT")


def head_of(ctx: Context, kind: type[HeadT], method: str) -> HeadT:
    """The model's head, checked to be the ``kind`` the method built (a TypeError otherwise)."""
    head = ctx.model.head
    if not isinstance(head, kind):
        raise TypeError(f"{method} needs the {kind.__name__} head built by its build_model")
    return head


def stage_record(indices: torch.Tensor, fit: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of a method's extra training stage (``engine.fit``'s answer)."""
    losses = fit["epoch_losses"]
    return {"train_images": int(indices.numel()), "final_loss": losses[-1] if losses else None,
            "train_seconds": fit["train_seconds"]}


def reset_classifier(model: IncrementalNet, key: str) -> None:
    """Re-initialise every row of the linear head (old and new classes), as the originals of
    IL2M and active IL do with a new last layer at every incremental state. ``key`` names the
    config option for the error on a cosine head."""
    head = model.head
    if not isinstance(head, IncrementalLinear):
        raise UserError(f"config key '{key}' needs the linear head")
    head.reset_parameters()


def freeze(model: IncrementalNet) -> IncrementalNet:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_old_logits(ctx: Context, x: torch.Tensor) -> torch.Tensor | None:
    """The frozen previous model's logits of the old classes on ``x`` (float32, no gradient),
    what the distillation losses read; None in a state without teacher or old classes."""
    if ctx.teacher is None or ctx.state.n_old == 0:
        return None
    with torch.no_grad():
        return ctx.teacher(x)["logits"].float()[:, : ctx.state.n_old]


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): cross-entropy between
    softmax(teacher / T) and softmax(student / T), averaged over the batch."""
    target = F.softmax(teacher / temperature, dim=1)
    return -(target * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()
