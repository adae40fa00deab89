"""Class rows split in two blocks, as LUCIR's ``SplitCosineLinear``: ``weight_old``, the rows of
the classes learned in earlier states (frozen: ``requires_grad=False``, no gradient, left out of
the optimiser, so no weight decay either), and ``weight_new``, the rows of the current state's
classes (trained). Growing the head freezes the current rows and appends fresh ones; rebuild
optimisers afterwards, the parameters are new objects. ``load_state_dict`` takes the block sizes
from the state dict, so a head grown once by the total number of classes loads any checkpoint
of the same class count. Shared by LUCIR's cosine head and PODNet's proxies."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SplitRows(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.weight_old = nn.Parameter(torch.empty(0, in_dim), requires_grad=False)
        self.weight_new = nn.Parameter(torch.empty(0, in_dim))

    @property
    def num_frozen(self) -> int:
        """Number of frozen rows; they come first."""
        return self.weight_old.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """Every row ``(R, D)``, old rows first."""
        return torch.cat([self.weight_old, self.weight_new], 0)

    def _fresh_rows(self, n: int) -> torch.Tensor:
        """``n`` uninitialised rows of the weights' dtype and device."""
        if n < 0:
            raise ValueError(f"cannot add a negative number of classes ({n})")
        return self.weight_new.new_empty(n, self.in_dim)

    def _append(self, fresh: torch.Tensor) -> None:
        """Freeze every current row and make ``fresh`` the trained block."""
        merged = self.weight.detach().clone()
        self.weight_old = nn.Parameter(merged, requires_grad=False)
        self.weight_new = nn.Parameter(fresh)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Re-create the blocks with the checkpoint's sizes, keeping which one is frozen.
        for name, trainable in (("weight_old", False), ("weight_new", True)):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is None or saved.dim() != 2 or saved.shape[1] != self.in_dim:
                continue
            if saved.shape != current.shape:
                setattr(self, name, nn.Parameter(current.new_empty(saved.shape), requires_grad=trainable))
        super()._load_from_state_dict(state_dict, prefix, *args)
