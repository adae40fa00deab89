"""A fit that diverged: the engine's check, once per epoch, that the loss, each of its named
terms and every trained parameter are finite. What it reads rides on the epoch's one host sync
(:meth:`cilkit.training.engine.Engine.fit`); what it raises, :class:`~cilkit.common.errors.RunDiverged`,
names the state, stage, epoch and the term that went non-finite (the run records it and stops).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cilkit.common.errors import RunDiverged
from cilkit.training.protocol import Context


def all_finite(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Whether every element of ``params`` is finite, as a 0-d tensor on the device: read with
    the epoch's means, in the same host sync."""
    if not params:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()


def track_peak(peaks: dict[str, torch.Tensor], name: str, term: torch.Tensor) -> None:
    """Keep the largest finite magnitude of loss term ``name`` over the epoch's batches, on the
    device (no host sync): when a term's weight blows the model up, every term goes non-finite
    in the next batch, and the one that grew first is the one to name."""
    size = torch.nan_to_num(term.detach().float().abs(), nan=0.0, posinf=0.0)
    peaks[name] = torch.maximum(peaks[name], size) if name in peaks else size


def check_finite(ctx: Context, stage: str, epoch: int, lr: float, loss: float, terms: dict[str, float],
                  params_finite: bool, peaks: dict[str, float]) -> None:
    """Raise :class:`~cilkit.common.errors.RunDiverged` when the epoch's mean loss, one of its
    terms, or a parameter after it is NaN or infinite. It names the non-finite term (of several,
    the one whose finite batch values had grown largest, ``peaks``: the likely cause; the first
    in the loss's order on a tie), ``"loss"`` when only their sum overflowed, ``"parameters"``
    when the loss stayed finite."""
    bad = [name for name, value in terms.items() if not math.isfinite(value)]
    if not bad and math.isfinite(loss) and params_finite:
        return
    record: dict[str, Any] = {"state": ctx.state.index + 1, "round": ctx.round + 1, "stage": stage, "epoch": epoch,
                              "lr": lr}
    if bad:
        term = max(bad, key=lambda n: peaks.get(n, 0.0))  # max keeps the first of equals
        record.update(term=term, value=str(terms[term]), peak=peaks.get(term), also=[n for n in bad if n != term])
    elif not math.isfinite(loss):
        record.update(term="loss", value=str(loss))
    else:
        record.update(term="parameters", value="non-finite")
    raise RunDiverged(record)
