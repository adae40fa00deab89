"""BiC's bias correction layer (Wu et al., "Large Scale Incremental Learning", CVPR 2019, Sec. 4.2).

A bias layer holds two scalars, ``alpha`` (init 1) and ``beta`` (init 0), and rescales only the
logits of one contiguous range of class positions, the classes that were new in the state the
layer belongs to (the paper's Eq. 4)::

    o = [z_1 .. z_n,  alpha * z_{n+1} + beta, .., alpha * z_{n+m} + beta]

Every other column passes through unchanged. One layer belongs to one state: BiC applies the
current state's layer at test time and the previous state's layer to its teacher's logits.
"""

from __future__ import annotations

import torch
from torch import nn


def correct_logits(logits: torch.Tensor, start: int, stop: int, alpha: torch.Tensor | float,
                   beta: torch.Tensor | float) -> torch.Tensor:
    """``logits`` with columns ``start..stop-1`` replaced by ``alpha * z + beta`` (Eq. 4).

    Not in place: the result is a new tensor, differentiable in ``alpha`` and ``beta``.
    """
    if not 0 <= start <= stop <= logits.shape[1]:
        raise ValueError(f"bias layer columns {start}..{stop - 1} outside the {logits.shape[1]} logits")
    corrected = alpha * logits[:, start:stop] + beta
    return torch.cat([logits[:, :start], corrected, logits[:, stop:]], dim=1)


class BiasLayer(nn.Module):
    """Two learnable scalars applied to the logits of classes ``start..stop-1``."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        if not 0 <= start <= stop:
            raise ValueError(f"invalid class range {start}..{stop}")
        self.start, self.stop = start, stop
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Corrected logits (same shape); the layer's classes must be among the columns."""
        return correct_logits(logits, self.start, self.stop, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"classes={self.start}..{self.stop - 1}, alpha={self.alpha.item():.4f}, beta={self.beta.item():.4f}"
