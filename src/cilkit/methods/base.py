"""What methods share beyond the hook protocol: the protocol itself is :mod:`cilkit.training.protocol`
(re-exported here, so a method imports one module), and below are the helpers several methods
use (the head of a kind, a stage's record, the teacher's old-class logits, softmax
distillation) and :class:`BuildsOn`, a method built on another one (SIR on its base).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from cilkit.common.errors import UserError
from cilkit.models import IncrementalLinear, IncrementalNet
from cilkit.settings.registry import METHODS
from cilkit.training.protocol import (Batch, Context, EpochRecord, FitHooks, FitSpec, LossTerms, Method, MethodConfig,
                             StateRecord, TrainingRecord, freeze)

__all__ = ["Batch", "BuildsOn", "Context", "EpochRecord", "FitHooks", "FitSpec", "LossTerms", "Method",
           "MethodConfig", "StateRecord", "TrainingRecord", "distillation_kl", "freeze", "head_of",
           "reset_classifier", "stage_record", "teacher_old_logits"]


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


@contextlib.contextmanager
def frozen(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """``params`` frozen (``requires_grad`` off) inside the block, their flags restored after it:
    a stage that trains part of the model (LUCIR's class-balanced finetuning, DER's classifier
    learning)."""
    params = list(params)
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def teacher_old_logits(ctx: Context, batch: Batch) -> torch.Tensor | None:
    """The frozen previous model's logits of the old classes on the batch (float32, no
    gradient; the engine ran its forward), what the distillation losses read; None in a state
    without teacher or old classes."""
    if batch.teacher is None or ctx.state.n_old == 0:
        return None
    return batch.teacher["logits"][:, : ctx.state.n_old]


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): cross-entropy between
    softmax(teacher / T) and softmax(student / T), averaged over the batch."""
    target = F.softmax(teacher / temperature, dim=1)
    return -(target * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


class BuildsOn(Method):
    """A method built on another one, its ``base`` (SIR on fine-tuning, LUCIR or PODNet):
    every hook of the protocol that the subclass does not define is the base's, forwarded
    here once for all (:data:`FORWARDED`), as are the class attributes the runner and the
    engine read (:data:`FORWARDED_ATTRIBUTES`). The subclass's own hooks call ``self.base``
    where they extend it."""

    base: Method

    def __init__(self, config: Any, options: MethodConfig | None = None, *, base: Method | None = None) -> None:
        """``base``: the method built on; by default the one the options name (``<name>.base``),
        with its own options (under its own name in the config)."""
        super().__init__(config, options)
        self.base = base if base is not None else METHODS[getattr(self.cfg, "base")](config)
        for attr in FORWARDED_ATTRIBUTES:
            setattr(self, attr, getattr(self.base, attr))


# every public hook of Method, but for what keys a method by itself (its state-0 identity)
FORWARDED: tuple[str, ...] = tuple(
    name for name, value in {**vars(FitHooks), **vars(Method)}.items()
    if inspect.isfunction(value) and not name.startswith("_") and name not in ("state0_like", "state0_signature")
)
FORWARDED_ATTRIBUTES: tuple[str, ...] = ("needs_teacher", "needs_stages", "primary_scores", "classification_term")


def _forwarded(name: str) -> Any:
    def hook(self: BuildsOn, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.base, name)(*args, **kwargs)

    hook.__name__ = name
    hook.__doc__ = f"The base method's ``{name}``."
    return hook


for _name in FORWARDED:
    setattr(BuildsOn, _name, _forwarded(_name))
