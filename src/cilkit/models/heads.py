"""Classifier heads that grow as new classes arrive, and the backbone + head model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _linear_init(weight: torch.Tensor, bias: torch.Tensor, in_dim: int) -> None:
    """In-place ``nn.Linear`` default init: kaiming_uniform(a=sqrt(5)), bias U(+-1/sqrt(D))."""
    if weight.numel() == 0:
        return
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(in_dim) if in_dim > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)


class IncrementalLinear(nn.Module):
    """A linear classifier whose output rows grow state by state.

    ``weight`` is one ``nn.Parameter`` of shape ``(C, D)`` and ``bias`` one of shape ``(C,)``.
    ``add_classes(n)`` re-creates both by concatenating the old values (kept bit-identical)
    with ``n`` new rows initialised like ``nn.Linear``'s default from the global torch RNG.
    Because the parameters are new objects after growth, optimizers (and anything else
    holding references to the old parameters) must be rebuilt after ``add_classes``.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.weight = nn.Parameter(torch.empty(0, in_dim))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        """Current number of output classes."""
        return self.weight.shape[0]

    def add_classes(self, n: int) -> None:
        """Append ``n`` freshly initialised output rows, keeping the old rows exactly."""
        if n < 0:
            raise ValueError(f"cannot add a negative number of classes ({n})")
        old_w, old_b = self.weight.detach(), self.bias.detach()
        new_w = torch.empty(n, self.in_dim, dtype=old_w.dtype, device=old_w.device)
        new_b = torch.empty(n, dtype=old_b.dtype, device=old_b.device)
        _linear_init(new_w, new_b, self.in_dim)
        self.weight = nn.Parameter(torch.cat([old_w, new_w], 0))
        self.bias = nn.Parameter(torch.cat([old_b, new_b], 0))

    def reset_parameters(self) -> None:
        """Re-initialise all rows (e.g. IL2M's option to re-initialise the classifier)."""
        with torch.no_grad():
            _linear_init(self.weight, self.bias, self.in_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)``; ``(N, 0)`` when no class has been added yet."""
        return F.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}"


class IncrementalNet(nn.Module):
    """A backbone followed by a growable head; forward returns features and logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(N, D)``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"features": f, "logits": head(f)}``."""
        f = self.backbone(x)
        return {"features": f, "logits": self.head(f)}

    def add_classes(self, n: int) -> None:
        """Grow the head by ``n`` classes (rebuild optimizers afterwards)."""
        self.head.add_classes(n)

    @property
    def num_classes(self) -> int:
        """Number of classes the head currently outputs."""
        return self.head.num_classes
