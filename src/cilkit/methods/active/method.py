"""Active class-incremental learning for imbalanced datasets (Belouadah, Popescu, Aggarwal &
Saci, IPCV workshop at ECCV 2020; docs/methods.md, "active").

State 0 is fully labelled and trained as fine-tuning (FT). From state 1 on, the new classes'
training images are an unlabelled pool held by an :class:`~cilkit.methods.active.Oracle`; an annotation
budget of ``budget`` x pool images is spent in ``cycles`` rounds (``first_share`` of it in the
first, the rest split evenly over the others: 40 / 20 / 20 / 20 % by default). Each round is
one ``train_set`` + fit of the runner: ``train_set`` annotates the round's share, then returns
the exemplars + every image annotated so far in the state (cross-entropy, FT; no distillation).

* Round 0 selects with the *previous* model (frozen in ``before_state``) and the ``classical``
  function; later rounds with the current model and the ``balancing`` function (``none``: the
  classical one again).
* ``scaling``: class prediction scaling ``p'_j = p_j * N / n_j`` (``n_j`` training images of
  class j in the training set of the model, ``N`` their total; unchanged where ``n_j = 0``),
  in the probabilities the acquisition functions see and in the test scores (``predict``);
  never in training. Round 0 uses the counts the previous model was trained with.
  ``renormalise`` (default true, cilkit's choice): entropy, margin and least confidence rank
  the scaled scores renormalised per row; ``false`` ranks them unnormalised, as the original
  code does (:func:`cilkit.methods.active.acquisition.acquisition_probabilities`; the picks differ).
* ``reinit_classifier`` (default true, the original's ``model.fc = nn.Linear(...)`` at every
  incremental state): before a state's first cycle, the whole last layer (old and new rows) is
  re-initialised; the backbone continues from the previous model, which also keeps its own
  layer to select the first cycle. ``false``: the previous rows are kept and new ones appended
  (fine-tuning's default).
* Acquisition functions: least confidence is cilkit's addition (the original has random,
  k-centers, entropy and max-margin). ``bcore`` as released cannot run (its distance matrix and
  the annotated images' features are never built, see :mod:`cilkit.methods.active.acquisition`);
  cilkit implements its described intent.
* The memory stores annotated images only (``memory_candidates``).

Reading chosen where the sources leave a choice:
* default ``classical: random`` + ``balancing: poor``, the original code's config
  (``ail/configs/config.cf``); ``scaling: true`` (its ``apply_th_val_al = True``).
* Budget: ``round(budget * pool)`` (half up) per state, spent exactly; round r's share is the
  difference of the half-up-rounded cumulative shares (the original truncates each share, so
  it may spend less). Each round trains ``train.epochs`` epochs (the original: 80 / 4 = 20)
  with a fresh optimiser at ``train.lr`` (the original resets the learning rate each cycle).
* Features (k-center, poor, bcore): the model's pooled features of the whole state pool
  (annotated or not), min-max normalised per dimension over it, recomputed each round with the
  round's model; the class means ``mu_c`` are those of the annotated images in that space. The
  original keeps the features saved when each image was annotated.
* Per state, ``results.json`` gets ``annotation_budget``, ``annotations``,
  ``annotations_per_cycle``, ``annotations_per_class`` (class position -> count),
  ``labels_revealed`` (the oracle's counter) and ``pool_size``; ``active/state_XX.json`` in the
  run directory lists the annotated indices of each round.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from cilkit.methods.active import acquisition as af
from cilkit.methods.active.oracle import Oracle
from cilkit.cil.rectify import prediction_scaling
from cilkit.cil.classwise import class_counts
from cilkit.settings.registry import register_method as register
from cilkit.cil.budgets import annotation_budget, cycle_budgets
from cilkit.methods.base import Context, Method, MethodConfig, reset_classifier
from cilkit.settings.options import option
from cilkit.common.seeding import seeded_generator

Classical = Literal["random", "entropy", "margin", "least_confidence", "kcenter"]


class ActiveConfig(MethodConfig):
    budget: float = option(0.05, gt=0, le=1, help="fraction of each state's unlabelled pool to annotate")
    cycles: int = option(4, ge=1, help="annotation / training rounds per state")
    first_share: float = option(0.4, gt=0, le=1, help="share of the budget spent in the first cycle")
    classical: Classical = option(
        "random", help="first-cycle function, on the previous model: random, entropy, margin, least_confidence, "
                       "kcenter")
    balancing: Literal["poor", "bcore", "none"] = option(
        "poor", help="later cycles' function, on the current model: poor, bcore or none")
    scaling: bool = option(True, help="class prediction scaling at inference and in acquisition")
    renormalise: bool = option(
        True, help="acquisition on scaled scores renormalised per row (cilkit); false: as they are (the original)")
    margin_order: Literal["standard", "original"] = option(
        "standard", help="standard: smallest gaps first; original: largest first")
    reinit_classifier: bool = option(
        True, help="a new last layer (all rows re-initialised) at every incremental state, as the original "
                   "(main.py: model.fc = nn.Linear(..., base + P * (b - 1)) before each state's training)")
    quick: ClassVar[dict[str, Any]] = {"active.budget": 0.2, "active.cycles": 2}


@register("active")
class ActiveIL(Method):
    description = "active CIL: annotation budget in cycles (classical + poor/bcore), FT, class prediction scaling"
    Config = ActiveConfig
    cfg: ActiveConfig
    needs_teacher = True  # the previous model selects the first cycle

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_counts = torch.zeros(0, dtype=torch.int64)  # n_j of the current model's training set
        self.oracle: Oracle | None = None
        self.budgets: list[int] = []
        self.selections: list[torch.Tensor] = []  # per cycle, annotated training-set indices

    # ----- the state ---------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        super().before_state(ctx)  # the teacher (previous model, first-cycle selector) is copied first
        self.oracle, self.budgets, self.selections = None, [], []
        if ctx.state.index > 0 and self.cfg.reinit_classifier:
            reset_classifier(ctx.model, f"{self.name}.reinit_classifier")
        if ctx.state.index > 0:
            pool = ctx.state.train
            self.oracle = Oracle(pool, ctx.scenario.train_pos)
            self.budgets = cycle_budgets(annotation_budget(self.cfg.budget, pool.numel()), self.cfg.cycles,
                                         self.cfg.first_share)

    def rounds(self, ctx: Context) -> int:
        return 1 if ctx.state.index == 0 else self.cfg.cycles

    def begin_round(self, ctx: Context) -> None:
        """Annotate this round's share of the budget (from state 1 on), then count the round's
        training set (``n_j``, which prediction scaling and the acquisition read)."""
        if self.oracle is not None:
            self.selections.append(self._annotate_cycle(ctx, ctx.round))
            self.train_counts = self._training_counts(ctx)
        else:
            self.train_counts = class_counts(ctx.scenario.train_pos[self.train_set(ctx)], ctx.state.n_seen)

    def train_set(self, ctx: Context) -> torch.Tensor:
        """State 0: all its (labelled) images. Later: exemplars + every image annotated so far
        in the state."""
        if self.oracle is None:
            return super().train_set(ctx)
        return torch.cat([ctx.memory.indices(ctx.state.old), self.oracle.annotated])

    def _training_counts(self, ctx: Context) -> torch.Tensor:
        """(n_seen,) ``n_j`` of exemplars + annotated images: exemplar counts from the memory,
        new-class counts from the labels the oracle revealed."""
        st = ctx.state
        counts = self.pool_oracle.counts(st.n_seen).clone()
        counts[: st.n_old] = torch.tensor([ctx.memory.of_class(c).numel() for c in st.old], dtype=torch.int64)
        return counts

    def memory_candidates(self, ctx: Context) -> torch.Tensor:
        return ctx.state.train if self.oracle is None else self.oracle.annotated

    def after_state(self, ctx: Context) -> None:
        if self.oracle is None:
            return
        st = ctx.state
        counts = self.oracle.counts(st.n_seen)
        ctx.record.results.update({
            "pool_size": int(self.oracle.pool.numel()),
            "annotation_budget": sum(self.budgets),
            "annotations": int(self.oracle.annotated.numel()),
            "annotations_per_cycle": [int(s.numel()) for s in self.selections],
            "annotations_per_class": {str(c): int(counts[c]) for c in st.new},
            "labels_revealed": self.oracle.revealed,
        })
        sizes = [int(s.numel()) for s in self.selections]
        ctx.record.files.update({
            "budgets": self.budgets,
            "cycles": [s.tolist() for s in self.selections],  # training-set indices
            "labels": [y.tolist() for y in self.oracle.labels.split(sizes)],  # revealed positions
        })

    @property
    def pool_oracle(self) -> Oracle:
        """The oracle of the current incremental state (none in state 0)."""
        if self.oracle is None:
            raise RuntimeError("active: no unlabelled pool in state 0")
        return self.oracle

    # ----- selection ---------------------------------------------------------------------------
    def _cycle_generator(self, ctx: Context, r: int) -> torch.Generator:
        return seeded_generator(self.run_config.seed, "active", ctx.state.index, r)

    def _annotate_cycle(self, ctx: Context, r: int) -> torch.Tensor:
        """Annotate round ``r``'s share of the budget; returns the annotated indices."""
        oracle = self.pool_oracle
        k = min(self.budgets[r], oracle.unlabelled.numel())
        if k == 0:
            return torch.empty(0, dtype=torch.int64)
        function = self.cfg.classical if r == 0 or self.cfg.balancing == "none" else self.cfg.balancing
        model = ctx.model if r > 0 or ctx.teacher is None else ctx.teacher
        gen = self._cycle_generator(ctx, r)
        candidates = oracle.unlabelled
        if function in ("poor", "bcore"):
            return candidates[self._balanced_rows(ctx, model, function, k, gen)]
        rows = self._classical_rows(ctx, model, function, k, gen)
        oracle.annotate(candidates[rows])
        return candidates[rows]

    def _classical_rows(self, ctx: Context, model: torch.nn.Module, function: str, k: int,
                        gen: torch.Generator) -> torch.Tensor:
        """Rows of ``oracle.unlabelled`` picked by a classical function (not yet annotated)."""
        oracle = self.pool_oracle
        if function == "random":
            return af.random_pick(oracle.unlabelled.numel(), k, gen)
        logits, features = self._pool_outputs(ctx, model, oracle.pool)
        is_cand = ~oracle.is_annotated(oracle.pool)
        if function == "kcenter":
            return af.kcenter_pick(features[is_cand], k, gen, features[self._pool_rows(oracle.pool, oracle.annotated)])
        probs = af.acquisition_probabilities(logits[is_cand], self.train_counts if self.cfg.scaling else None,
                                             renormalise=self.cfg.renormalise)
        if function == "entropy":
            return af.entropy_pick(probs, k)
        if function == "margin":
            return af.margin_pick(probs, k, self.cfg.margin_order)
        return af.least_confidence_pick(probs, k)

    def _balanced_rows(self, ctx: Context, model: torch.nn.Module, function: str, k: int,
                       gen: torch.Generator) -> torch.Tensor:
        """Rows of ``oracle.unlabelled`` picked by ``poor`` or ``bcore``, which annotate as they
        go (each pick's revealed label steers the next)."""
        oracle = self.pool_oracle
        candidates = oracle.unlabelled
        _, features = self._pool_outputs(ctx, model, oracle.pool)
        pool_features = features[~oracle.is_annotated(oracle.pool)]
        centres = features[self._pool_rows(oracle.pool, oracle.annotated)]
        stats = af.ClassStats.of(centres, oracle.labels, ctx.state.n_seen)

        def annotate(row: int) -> int:
            return int(oracle.annotate(candidates[row])[0])

        if function == "poor":
            return af.poor_pick(pool_features, k, stats, annotate, gen)
        return af.bcore_pick(pool_features, k, stats, annotate, gen, centres)

    @staticmethod
    def _pool_outputs(ctx: Context, model: torch.nn.Module, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and min-max normalised features of the whole pool; the labels the engine
        reads with the images are dropped here, unseen (only the oracle hands labels out)."""
        out = ctx.engine.infer(model, ctx.dataset.train, pool)
        return out["logits"], af.minmax_normalise(out["features"])

    @staticmethod
    def _pool_rows(pool: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows of ``pool`` holding ``indices`` (in the order of ``indices``)."""
        order = torch.argsort(pool)
        return order[torch.searchsorted(pool[order], indices)]

    # ----- scores ------------------------------------------------------------------------------
    def predict(self, ctx: Context, out: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.cfg.scaling:
            return out["logits"]
        return prediction_scaling(out["logits"], self.train_counts.to(out["logits"].device))

    def extra_scores(self, ctx: Context, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The other side of prediction scaling at inference: the raw logits (``unscaled``; runs
        made before it was named so call it ``cnn``, which :func:`~cilkit.rundir.readers.read_results`
        renames) when scaling is on, scaled probabilities (``scaled``) when it is off."""
        if self.cfg.scaling:
            return {"unscaled": out["logits"]}
        return {"scaled": prediction_scaling(out["logits"], self.train_counts.to(out["logits"].device))}

    # ----- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"train_counts": self.train_counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_counts = state["train_counts"].clone()
