"""What a run says about a fit that went wrong: one that learned nothing (its loss flat,
:func:`stalled`: a warning) and one that diverged (what to try, :func:`divergence_advice`, in the
line of :class:`~cilkit.common.errors.RunDiverged`)."""

from __future__ import annotations

import math
from typing import Any

STALL_RATIO = 0.9


def stalled(epoch_losses: list[float]) -> bool:
    """A fit whose last epoch's mean loss is within 10% of its first epoch's: a model that
    learned nothing (e.g. iCaRL's first state stuck at ln 2 per class under plain SGD). Means
    over whole epochs on both sides: a first batch that happens to score low is no baseline.
    One epoch (or none) tells nothing. A loss that went NaN or infinite learned nothing either
    (a comparison with NaN is always false: it is tested first; the engine stops such a fit,
    :class:`~cilkit.common.errors.RunDiverged`)."""
    if len(epoch_losses) < 2:
        return False
    if not all(math.isfinite(v) for v in epoch_losses):
        return True
    if not epoch_losses[0] > 0:
        return False
    return epoch_losses[-1] >= STALL_RATIO * epoch_losses[0]


def term_options(name: str, method: type, term: str) -> list[str]:
    """The options of method ``name`` (the fields of its ``Config``) that share a word with the
    loss term ``term`` (``kd``: ``wa.lambda_kd``; ``task_kd``: ``ssil.kd_weight``)."""
    words = set(term.split("_")) - {"loss"}
    fields = getattr(getattr(method, "Config", None), "model_fields", {})
    return [f"{name}.{f}" for f in fields if words & set(f.split("_"))]


def stall_message(desc: str, epoch_losses: list[float], method: str) -> str:
    """The warning of a fit that :func:`stalled`, naming the method's ``cilkit info`` page."""
    if not all(math.isfinite(v) for v in epoch_losses):
        return (f"{desc}: the mean loss went non-finite ({', '.join(f'{v:.3g}' for v in epoch_losses)}): the "
                f"model learned nothing; try a lower learning rate or another seed (see cilkit info {method})")
    return (f"{desc}: the mean loss of its last epoch ({epoch_losses[-1]:.3f}) is about that of its first "
            f"({epoch_losses[0]:.3f}): the model may have learned nothing; try another learning rate or seed "
            f"(see cilkit info {method})")


def divergence_advice(record: dict[str, Any], name: str, method: type) -> str:
    """``a lower learning rate (train.lr; 0.1 in this fit) or a smaller 'kd' term
    (wa.lambda_kd), or another seed``: the method's options that name the term (a word of
    it, :func:`term_options`: its weight, margin, reduction ...) are what shapes it."""
    stage, lr, term = record["stage"], record["lr"], record["term"]
    advice = (f"a lower learning rate (train.lr; {lr:g} in this fit)" if stage == "train"
              else f"a lower learning rate of its {stage} ({lr:g} in this fit)")
    options = term_options(name, method, term)
    if options:
        advice += f" or a smaller '{term}' term ({', '.join(options)})"
    return advice + ", or another seed"
