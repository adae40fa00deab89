"""Exemplar memory: budget policies and herding / random selection.

Each class keeps a *priority list* of training indices, chosen once, in the state where the
class is new (while all its data is available). Its share of the memory is a prefix of that
list, so shrinking a class's share keeps its first picks (iCaRL, Rebuffi et al. 2017, Alg. 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cilkit.common.errors import UserError
from cilkit.settings.config import MemoryConfig

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding (Rebuffi et al. 2017, Algorithm 4): with L2-normalised features ``f`` and
    their mean ``mu``, pick greedily, without replacement, the sample that brings the mean of
    the picked set closest to ``mu``. Returns the first ``m`` picks, in pick order.

    Each pick is a few vector ops over the class on the features' device.
    """
    f = F.normalize(features.float(), dim=1)
    m = min(m, f.shape[0])
    mu = f.mean(dim=0)
    picked_sum = torch.zeros_like(mu)
    taken = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
    order = torch.empty(m, dtype=torch.int64, device=f.device)
    for k in range(1, m + 1):
        # ||mu - (S + f_i) / k|| is minimised by the same i as ||k * mu - S - f_i||.
        dist = ((k * mu - picked_sum)[None, :] - f).norm(dim=1)
        dist[taken] = float("inf")
        i = int(dist.argmin())
        order[k - 1] = i
        taken[i] = True
        picked_sum += f[i]
    return order.cpu()


def class_quotas(budget_total: int | None, per_class: int | None, n_seen: int) -> list[int]:
    """Exemplars per seen class (positions 0..n_seen-1).

    Fixed-total mode: ``floor(K / n_seen)`` each, and the remainder ``K mod n_seen`` goes one
    image each to the oldest classes (lowest positions), so the budget is used exactly.
    Per-class mode: ``m`` each. No memory: 0 each.
    """
    if per_class is not None:
        return [per_class] * n_seen
    if not budget_total or n_seen == 0:
        return [0] * n_seen
    base, extra = divmod(budget_total, n_seen)
    return [base + (1 if c < extra else 0) for c in range(n_seen)]


def shared_budget_total(budget_bytes: int, model_bytes: int, image_bytes: int, state: int) -> int:
    """The exemplars a budget shared with the model leaves (``memory.budget_bytes``, the
    memory-aligned comparison of Zhou et al., ICLR 2023): ``floor((budget - model) / image)``,
    the model as it is when the memory of 0-based ``state`` is filled. A model larger than the
    budget is refused in one line (the comparison would not be memory-aligned)."""
    if model_bytes > budget_bytes:
        raise UserError(f"state {state + 1}: the model ({model_bytes} bytes) outgrew memory.budget_bytes "
                        f"({budget_bytes}), which it shares with the exemplars: raise memory.budget_bytes to at "
                        f"least the model's bytes plus the exemplars to keep, and start a new run")
    return (budget_bytes - model_bytes) // image_bytes


class Memory:
    """Priority lists per class position, and the current quotas."""

    def __init__(self, cfg: MemoryConfig) -> None:
        self.cfg = cfg
        self.ranking: dict[int, torch.Tensor] = {}
        self.quotas: list[int] = []

    def update(
        self,
        n_seen: int,
        new_classes: dict[int, torch.Tensor],
        features_of: FeatureFn,
        generator: torch.Generator,
        total: int | None = None,
    ) -> None:
        """Re-balance quotas over ``n_seen`` classes and rank the new classes' candidates.

        ``new_classes`` maps a class position to the training indices it may store.
        ``features_of(indices)`` gives their features (herding only). ``total``: the state's
        images under ``memory.budget_bytes`` (:func:`shared_budget_total`), re-balanced as
        ``memory.total`` is; None: the config's ``total`` or ``per_class``.
        """
        if total is None:
            self.quotas = class_quotas(self.cfg.total, self.cfg.per_class, n_seen)
        else:
            self.quotas = class_quotas(total, None, n_seen)
        for c, candidates in new_classes.items():
            m = min(self.quotas[c], candidates.numel())
            if m == 0:
                self.ranking[c] = candidates[:0].clone()
            elif self.cfg.selection == "herding":
                self.ranking[c] = candidates[herding_order(features_of(candidates), m)]
            else:
                self.ranking[c] = candidates[torch.randperm(candidates.numel(), generator=generator)[:m]]

    def assign(self, n_seen: int, contents: dict[int, torch.Tensor]) -> None:
        """Hold exactly ``contents`` (class position -> training indices) for the ``n_seen``
        classes: a method's own memory (see ``Method.memory_contents``), each class's images in
        the method's order, its quota their number."""
        self.quotas = [int(contents[c].numel()) if c in contents else 0 for c in range(n_seen)]
        self.ranking = {c: contents[c].clone() for c in range(n_seen) if c in contents}

    def of_class(self, c: int) -> torch.Tensor:
        if c >= len(self.quotas) or c not in self.ranking:
            return torch.empty(0, dtype=torch.int64)
        return self.ranking[c][: self.quotas[c]]

    def indices(self, classes: range | None = None) -> torch.Tensor:
        """The stored training indices of ``classes`` (default: all), class by class."""
        classes = classes if classes is not None else range(len(self.quotas))
        parts = [self.of_class(c) for c in classes]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.indices().numel())

    def as_lists(self) -> dict[str, list[int]]:
        return {str(c): self.of_class(c).tolist() for c in range(len(self.quotas))}

    def state_dict(self) -> dict:
        return {"ranking": {int(c): r.clone() for c, r in self.ranking.items()}, "quotas": list(self.quotas)}

    def load_state_dict(self, state: dict) -> None:
        self.ranking = {int(c): r.clone() for c, r in state["ranking"].items()}
        self.quotas = list(state["quotas"])
