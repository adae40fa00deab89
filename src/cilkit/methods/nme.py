"""Nearest-mean-of-exemplars classification, shared by iCaRL, LUCIR and PODNet.

iCaRL (Rebuffi et al., CVPR 2017, Alg. 1): the mean of a class is the mean of the
L2-normalised features of its exemplars, re-normalised; a test image goes to the class whose
mean is nearest to its normalised feature. As in iCaRL's and LUCIR's original code, when the
dataset trains with horizontal flips the flipped exemplars are averaged in as well (LUCIR's
code: ``(mean(D) + mean(D_flip)) / 2`` then normalised, which is the mean over both sets here
since a class has as many flipped images as plain ones).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cilkit.cil.classwise import normalised_class_means
from cilkit.methods.base import Context, Method


def exemplar_means(ctx: Context, model: torch.nn.Module) -> torch.Tensor:
    """(n_seen, D) normalised means of each seen class's normalised exemplar features under
    ``model`` (eval transform), from one feature pass over all exemplars (and one over their
    flips). A class with no exemplar falls back to its training images when it is new in this
    state (they are at hand); a class with neither gets a row of NaN."""
    st, pos_of = ctx.state, ctx.scenario.train_pos
    exemplars = ctx.memory.indices(st.seen)
    without = [c for c in st.new if ctx.memory.of_class(c).numel() == 0]
    fallback = st.train[torch.isin(pos_of[st.train], torch.tensor(without, dtype=torch.int64))]
    idx = torch.cat([exemplars, fallback])
    features, positions = ctx.engine.train_features(model, idx), pos_of[idx]
    if ctx.dataset.augment.flip:
        features = torch.cat([features, ctx.engine.train_features(model, idx, hflip=True)])
        positions = torch.cat([positions, positions])
    return normalised_class_means(features, positions, st.n_seen)


def nme_scores(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """NME scores ``(N, C)``: minus the squared Euclidean distance between each normalised
    feature and each class mean (so argmax = nearest mean); -inf for a class without a mean."""
    f = F.normalize(features, dim=1)
    scores = -torch.cdist(f, means.to(f.device)).pow(2)
    return torch.nan_to_num(scores, nan=float("-inf"))


class WithClassMeans(Method):
    """A method that keeps the exemplar class means of its latest state: NME scores as a variant
    beside the CNN's (LUCIR, PODNet), or as its primary scores (iCaRL overrides ``predict``).
    The means are what a resume needs of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_means = torch.empty(0)

    def update_class_means(self, ctx: Context) -> None:
        """The means under the state's final model (call at the end of ``after_state``)."""
        self.class_means = exemplar_means(ctx, ctx.model)

    def nme(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return nme_scores(out["features"], self.class_means)

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"nme": self.nme(out)}

    def state_dict(self) -> dict[str, Any]:
        return {"class_means": self.class_means}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_means = state["class_means"]
