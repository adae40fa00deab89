"""PODNet's local similarity classifier (Douillard et al., "PODNet: Pooled Outputs Distillation
for Small-Tasks Incremental Learning", ECCV 2020, Sec. 3.2, Eq. 6-7).

Each class ``c`` has ``K`` proxies ``theta_{c,k}``. With L2-normalised features ``h`` and
proxies, the similarity of a proxy is, as the original's ``neg_stable_cosine_distance``, minus
the squared distance of the unit vectors, ``-||h - theta||^2 = 2 cos(h, theta) - 2`` (the
paper writes the cosine; the two differ by an affine map, which the softmax merge and the
learned scale absorb only in part, so the code's form is taken). The class similarity merges
the proxies with a softmax (Eq. 6)::

    s_c(h) = sum_k softmax_k(gamma * s_{c,k}) * s_{c,k}

and the logits are ``eta * s_c`` with one learned scalar ``eta`` (the original's learned
post-processing scale, initialised to 1), which the NCA loss uses as its scale.

The proxies are split as LUCIR's cosine head's rows (:class:`~cilkit.models.split.SplitRows`):
``weight_old`` (the classes of earlier states, frozen and left out of the optimiser, as the
original's group factor ``old_weights: 0``) and ``weight_new`` (this state's classes). ``add_classes(n)`` freezes the current proxies and
appends ``n * K`` fresh ones drawn from a Kaiming normal (the original's ``add_classes``); a
method may overwrite them (imprinting, :meth:`set_new_proxies`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.models.split import SplitRows


class LocalSimilarityClassifier(SplitRows):
    def __init__(self, in_dim: int, proxies_per_class: int = 10, gamma: float = 1.0) -> None:
        super().__init__(in_dim)
        self.proxies = proxies_per_class
        self.gamma = gamma
        self.scale = nn.Parameter(torch.ones(()))  # eta

    @property
    def num_classes(self) -> int:
        return (self.weight_old.shape[0] + self.weight_new.shape[0]) // self.proxies

    def add_classes(self, n: int) -> None:
        """Freeze every current proxy and append ``K`` Kaiming-normal proxies for each of ``n`` classes."""
        fresh = self._fresh_rows(n * self.proxies)
        if fresh.numel():
            nn.init.kaiming_normal_(fresh, nonlinearity="linear")
        self._append(fresh)

    def set_new_proxies(self, proxies: torch.Tensor) -> None:
        """Overwrite this state's proxies ``(n_new * K, D)`` (imprinting)."""
        with torch.no_grad():
            self.weight_new.copy_(proxies.to(self.weight_new))

    def proxy_similarities(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C * K)``: minus the squared distance of the unit feature and unit proxy."""
        h, w = F.normalize(features, dim=1), F.normalize(self.weight, dim=1)
        return 2.0 * F.linear(h, w) - 2.0

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` class similarities ``s_c`` (Eq. 6), unscaled."""
        s = self.proxy_similarities(features).view(features.shape[0], -1, self.proxies)
        return (torch.softmax(self.gamma * s, dim=-1) * s).sum(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``eta * s_c``."""
        return self.scale * self.similarities(features)
