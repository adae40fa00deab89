"""ScaIL, classifier weights scaling (Belouadah & Popescu, "ScaIL: Classifier Weights Scaling for
Class Incremental Learning", WACV 2020), live.

Training is fine-tuning with memory (:mod:`cilkit.methods.finetune`). After every state the
method keeps the state's classifier (weights and biases of its linear head), and at test time
each old class scores with its rows from the state where it was learned, when all its images
were available, rescaled to the current state's new classes by the rank-wise weight statistics
and the bias counts of :func:`cilkit.cil.rectify.scail_classifier`; only the ``top_rewinded`` old
classes that the current classifier ranks highest for an image keep their score
(:func:`cilkit.cil.rectify.scail_scores`), as the authors' ``scail/codes/scail.py`` does (10 in
all its runs).

Every fine-tuning run stores what ScaIL reads (each state's test features and classifier in
``scores/state_XX.npz``), so ``cilkit calibrate RUN --with scail`` rectifies a finished
``finetune`` run without its model; with the default options it gives this method's numbers
(the same stored float32 features and classifiers, the same float64 computation).

Readings: ``reading: code`` (default) multiplies the weight in dimension ``d`` by the factor at
index ``argsort(-w)[d]``, as the authors' loop does; ``rank`` multiplies the ``k``-th largest
``|w|`` by the ``k``-th factor, the rank-wise reading (see :func:`~cilkit.cil.rectify.scail_classifier`).
The bias factor is what the authors' code computes (a ratio of counts of non-zero biases, its
``normalize`` acting on one-element rows), not a ratio of mean biases. ``calibrate`` uses the
defaults.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Context, head_of
from cilkit.methods.finetune import Finetune, FinetuneConfig
from cilkit.models import IncrementalLinear
from cilkit.settings.options import option
from cilkit.cil.rectify import scail_classifier, scail_scores


class ScaILConfig(FinetuneConfig):
    # read from state 1 on only (as reinit_classifier)
    reading: Literal["code", "rank"] = option(
        "code", state0=False, help="code: the authors' loop (factor indexed by argsort(-w)[d]); "
                                   "rank: the k-th largest weight times the k-th factor")
    top_rewinded: int = option(
        10, ge=1, state0=False,
        help="old classes that keep a score per image: the current classifier's top ones (the authors: 10)")


@register("scail")
class ScaIL(Finetune):
    description = ("fine-tuning with memory + ScaIL: old classes score with their first-learned classifier rows, "
                   "rescaled by rank-wise weight statistics; only the current top old classes kept")
    Config = ScaILConfig
    cfg: ScaILConfig
    primary_scores = "scail"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # each state's classifier, float32 on CPU

    def after_state(self, ctx: Context) -> None:
        head = head_of(ctx, IncrementalLinear, "ScaIL")
        del self.heads[ctx.state.index:]  # a state run again (resume) replaces its classifier
        self.heads.append((head.weight.detach().float().cpu().clone(), head.bias.detach().float().cpu().clone()))

    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        b = ctx.state.index
        if b == 0:
            return out["logits"]
        weight, bias = self.heads[b]
        ends = ctx.scenario.ends[: b + 1]
        scaled = scail_classifier(weight, bias, self.heads[:b], ends, self.cfg.reading)
        return scail_scores(out["features"], weight, bias, scaled, ctx.state.n_old, self.cfg.top_rewinded)

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"cnn": out["logits"]}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": [w for w, _ in self.heads], "biases": [b for _, b in self.heads]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads = [(w.clone(), b.clone()) for w, b in zip(state["weights"], state["biases"])]
