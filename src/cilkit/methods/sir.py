"""SIR, self-paced imbalance rectification (Liu, Zhu, Cao; arXiv 2106.14747) -- a RECONSTRUCTION.

No code of SIR was published (its repository holds only a README) and we read only the
abstract. The abstract names three parts; each is implemented here as a separate, switchable
component with its own hyperparameters, following the reading in docs/sir.md. The defaults
of the hyperparameters are ours, not the paper's (``docs/sir.md``). SIR is a loss-level plug-in
(the paper builds it on PODNet and on DER, not on fine-tuning); here the host is fine-tuning
with memory (cross-entropy
on new data + exemplars, no distillation), and SIR acts in the states ``b >= 1``, where the new
samples outnumber the old exemplars; state 0 trains with plain cross-entropy, so its model is
the fine-tuning state-0 model. Scores at test time are the raw logits.

1. **Frequency compensation** ("adjusts the logits margin between old and new classes with the
   corresponding number ratio"): logit adjustment by the class frequencies of the state's
   training set, inside the training loss only (Menon et al., "Long-tail learning via logit
   adjustment", ICLR 2021, Eq. 10)::

       z'_j = z_j + tau_j * log(n_j / n_max)

   ``n_j`` = training images of class j in this state (exemplars for an old class, new images
   for a new one; clamped to >= 1), ``n_max = max_j n_j``. A rare (old) class gets a more
   negative offset, so the loss asks for a larger raw logit margin in its favour. Menon et al.
   write ``log(n_j / N)`` (the prior); softmax is shift-invariant, so with one ``tau`` for every
   class the two are the same loss. They differ once ``tau_j`` varies by class (component 3):
   the reference is the most frequent class, whose offset is 0 whatever its ``tau``.
2. **Inheritance transfer** ("reduce the representation confusion by estimating the similarity
   of different classes in the old embedding space"): at the start of the state, with the
   previous model (the model before this state's training), each old class o gets a prototype
   ``mu_o`` = the L2-normalised mean of the L2-normalised features of its exemplars, and each new
   class n a prototype ``mu_n`` from its new training images likewise. The class-to-class
   similarity ``q_n = softmax_o(cos(mu_n, mu_o) / T)`` over the old classes turns the one-hot
   target of every sample of new class n into::

       t = (1 - w) * onehot(n) + w * [q_n, 0, .., 0]      (w = transfer_weight)

   (old-class samples keep one-hot targets). The loss is the soft cross-entropy of ``t``; the
   mass on the sample's own class is scored against the compensated logits ``z'``, the
   inherited mass against the raw logits (see :func:`sir_loss` for why). This is the
   class-level reading ("similarity of different classes"); the similarity is not re-estimated
   per sample.
3. **Chronological attenuation** ("mitigate the repetitive optimization of the older classes at
   multiple step-wise increments"): the compensation strength of a class decays with its age,
   ``tau_j = tau * gamma ** age_j``, ``age_j = b - s_j`` = states since the class was learned
   (``s_j`` its state; new classes have age 0 and the full ``tau``). It acts on frequency
   compensation only (and needs it on). Reading chosen: attenuation shrinks an old class's
   compensation *relative to the most frequent class* (offset ``tau_j log(n_j / n_max)``, see
   1), i.e. toward "no compensation", never past it. With the prior ``log(n_j / N)`` instead,
   shrinking an old class's offset toward 0 moves it *above* the offsets of the new classes
   (``log(n_new / N) < 0``) once ``gamma ** age`` is small: on a long protocol the oldest
   classes would get a larger offset than the new ones, i.e. be pushed down rather than
   compensated (e.g. 90 old classes of 20 exemplars and 10 new of 500 images: at age 10 and
   ``gamma = 0.9``, old ``0.35 log(20/6800) = -2.03`` against new ``log(500/6800) = -2.61``).

Each component: ``sir: {frequency_compensation: false}`` etc. With all three off SIR is
fine-tuning with memory. ``benchmarks/bench_sir_ablation.py configs/ablations/sir-fashion-mnist.yaml``
runs the ablation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from cilkit.cil.classwise import class_counts, normalised_class_means
from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Batch, BuildsOn, Context, LossTerms, MethodConfig
from cilkit.settings.options import option
from cilkit.cil.scenario import Scenario


class SIRConfig(MethodConfig):
    frequency_compensation: bool = option(True, help="component 1: frequency compensation")
    tau: float = option(
        1.0, ge=0, help="strength of the compensation, offset tau * log(n_j / n_max) (1: the Bayes-consistent logit "
                        "adjustment of Menon et al.)")
    inheritance_transfer: bool = option(True, help="component 2: inheritance transfer")
    transfer_weight: float = option(
        0.1, ge=0, le=1, help="w: share of a new sample's target given to similar old classes (our default)")
    transfer_temperature: float = option(
        0.1, gt=0, help="T of the softmax over cosine similarities (our default)")
    chronological_attenuation: bool = option(True, help="component 3: chronological attenuation")
    attenuation: float = option(0.9, gt=0, le=1, help="gamma in tau_j = tau * gamma ** age_j (our default)")
    base: Literal["finetune", "lucir", "podnet"] = option(
        "finetune", help="the method SIR acts on (its model, hooks and regularisation; its options under its own "
                         "name): SIR's loss takes the place of its classification term from state 1 on (docs/sir.md)")

    @model_validator(mode="after")
    def _attenuation_needs_compensation(self) -> "SIRConfig":
        if self.chronological_attenuation and not self.frequency_compensation:
            raise ValueError("config key 'sir.chronological_attenuation': attenuates the frequency "
                             "compensation, so it needs sir.frequency_compensation: true")
        return self


# ----- the components, as pure functions ---------------------------------------------------------
def class_ages(scenario: Scenario, state: int) -> torch.Tensor:
    """(n_seen,) states since each seen class was learned: ``state - s_j``."""
    ends = torch.tensor(scenario.ends[: state + 1])
    positions = torch.arange(int(ends[-1]))
    learned_in = torch.bucketize(positions, ends, right=True)
    return state - learned_in


def compensation_strengths(tau: float, ages: torch.Tensor, attenuation: float | None) -> torch.Tensor:
    """(n_seen,) ``tau_j``: ``tau * attenuation ** age_j`` (chronological attenuation), or ``tau``
    for every class when ``attenuation`` is None."""
    if attenuation is None:
        return torch.full(ages.shape, float(tau))
    return tau * torch.pow(torch.tensor(float(attenuation)), ages.float())


def frequency_offsets(counts: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
    """(n_seen,) logit adjustment ``tau_j * log(n_j / n_max)``, <= 0, 0 for the most frequent
    class (counts clamped to >= 1, so that a class without training images keeps a finite
    offset). With equal ``tau_j`` it is the loss of ``tau * log(n_j / N)`` (softmax is
    shift-invariant); with attenuated ``tau_j`` a rarer class never gets a larger offset than a
    more frequent class of the same or a larger ``tau`` (module docstring, 3)."""
    n = counts.double().clamp_min(1.0)
    return (strengths.double() * torch.log(n / n.max())).float()


def transfer_distribution(new_protos: torch.Tensor, old_protos: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n_new, n_old) ``softmax_o(cos(mu_n, mu_o) / T)`` over the old classes; an old class
    without a prototype gets weight 0."""
    sim = new_protos @ old_protos.T  # both normalised: cosines
    sim = torch.nan_to_num(sim, nan=float("-inf"))
    return torch.softmax(sim / temperature, dim=1).nan_to_num(0.0)


def inheritance_targets(labels: torch.Tensor, n_seen: int, n_old: int, transfer: torch.Tensor,
                        weight: float) -> torch.Tensor:
    """(N, n_seen) targets: one-hot for old-class samples; ``(1 - w) * onehot(y) + w * q_y`` over
    the old classes for a sample of new class y (``q_y`` = row ``y - n_old`` of ``transfer``).
    A new class whose row is all zero (no old class has a prototype) keeps its one-hot target."""
    onehot = F.one_hot(labels, n_seen).float()
    is_new = labels >= n_old
    inherited = torch.zeros_like(onehot)
    inherited[:, :n_old] = transfer.to(onehot.device)[(labels - n_old).clamp_min(0)]
    mass = inherited.sum(dim=1, keepdim=True)  # 1, or 0 without old prototypes
    mixed = (1.0 - weight * mass) * onehot + weight * inherited
    return torch.where(is_new[:, None], mixed, onehot)


def sir_loss(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor | None,
             targets: torch.Tensor | None) -> torch.Tensor:
    """Batch mean of the SIR training loss.

    Hard labels: cross-entropy over the compensated logits ``z' = z + offsets``. With inheritance
    ``targets`` t: the mass on the sample's own class is scored against ``z'`` and the inherited
    mass (on the old classes) against the raw logits ``z``::

        -t_y log softmax(z')_y  -  sum_{o != y} t_o log softmax(z)_o

    Why the split (our reading): the inherited mass states how much an image looks like an old
    class, a property of the image, not of class frequencies. Scored against ``z'`` it would be
    divided by the old classes' small prior (logit adjustment trains ``z`` towards ``p(y|x) /
    p(y)``), i.e. multiplied by the new/old count ratio at test time; on Fashion-MNIST with
    memory 2000 that cost the new classes 15 points (benchmarks/RESULTS.md). Without offsets the
    two forms coincide: ``-sum_j t_j log softmax(z)_j``."""
    z = logits if offsets is None else logits + offsets.to(logits.device)
    if targets is None:
        return F.cross_entropy(z, labels)
    own = targets.gather(1, labels[:, None])
    inherited = targets.scatter(1, labels[:, None], 0.0)
    compensated = -(own * F.log_softmax(z, dim=1).gather(1, labels[:, None])).squeeze(1)
    transferred = -(inherited * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (compensated + transferred).mean()


# ----- the method --------------------------------------------------------------------------------
@register("sir")
class SIR(BuildsOn):
    """SIR on its base method (``sir.base``): every hook is the base's (:class:`BuildsOn`) but
    these: the state's set-up around the base's (inheritance targets, per-round offsets), the
    loss (SIR's in place of the base's classification term, the base's other terms kept) and
    what results.json keeps. ``offsets`` and ``transfer`` are the state's loss parameters, set
    before its training and read by every batch."""

    description = ("SIR (reconstruction from the abstract): frequency compensation, inheritance transfer, "
                   "chronological attenuation on top of a base method (fine-tuning with memory, LUCIR or PODNet)")
    Config = SIRConfig
    cfg: SIRConfig

    def __init__(self, config: Any, options: MethodConfig | None = None) -> None:
        super().__init__(config, options)  # the base the options name, with its own options
        self.offsets: torch.Tensor | None = None  # this round's logit adjustment
        self.transfer: torch.Tensor | None = None  # this state's (n_new, n_old) similarity targets

    def state0_signature(self) -> dict[str, Any]:
        return {"base": self.cfg.base, "base_options": self.base.cfg.model_dump(mode="json"),
                **self.base.state0_signature()}

    def before_state(self, ctx: Context) -> None:
        self.base.before_state(ctx)  # the base's head growth, imprinting ...
        self.offsets, self.transfer = None, None
        if ctx.state.index > 0 and self.cfg.inheritance_transfer:
            # ctx.model has not trained in this state yet: its backbone is the previous model's.
            self.transfer = self._old_space_similarity(ctx).to(ctx.device)  # read by every batch's targets

    def _old_space_similarity(self, ctx: Context) -> torch.Tensor:
        st = ctx.state
        old_idx = ctx.memory.indices(st.old)
        idx = torch.cat([old_idx, st.train])
        protos = normalised_class_means(ctx.engine.train_features(ctx.model, idx), ctx.scenario.train_pos[idx], st.n_seen)
        new_protos, old_protos = protos[st.new.start : st.new.stop], protos[: st.n_old]
        return transfer_distribution(new_protos, old_protos, self.cfg.transfer_temperature)

    def begin_round(self, ctx: Context) -> None:
        """The base's set-up, then, with frequency compensation, the logit offsets of the
        round's class counts ``n_j``."""
        self.base.begin_round(ctx)
        if ctx.state.index > 0 and self.cfg.frequency_compensation:
            self.offsets = frequency_offsets(self.round_counts(ctx, self.train_set(ctx)), self.strengths(ctx)).to(ctx.device)

    @staticmethod
    def round_counts(ctx: Context, indices: torch.Tensor) -> torch.Tensor:
        """(n_seen,) ``n_j``: the training images of each seen class in ``indices``."""
        return class_counts(ctx.scenario.train_pos[indices], ctx.state.n_seen)

    def strengths(self, ctx: Context) -> torch.Tensor:
        """(n_seen,) ``tau_j`` of this state (attenuated by age when that component is on)."""
        gamma = self.cfg.attenuation if self.cfg.chronological_attenuation else None
        return compensation_strengths(self.cfg.tau, class_ages(ctx.scenario, ctx.state.index), gamma)

    def after_state(self, ctx: Context) -> None:
        self.base.after_state(ctx)  # the base's stages (LUCIR's / PODNet's finetuning, class means)
        if ctx.state.index > 0:
            ctx.record.results.update(self._record(ctx))

    def _record(self, ctx: Context) -> dict[str, Any]:
        """What results.json keeps of the state: per class its training count (in the last
        round) and ``tau_j`` (null with frequency compensation off), and for each new class its
        most similar old class and that class's weight in the transfer distribution."""
        assert ctx.trained is not None and ctx.trained.rounds
        taus = self.strengths(ctx).tolist() if self.cfg.frequency_compensation else None
        rec: dict[str, Any] = {"train_counts": self.round_counts(ctx, ctx.trained.rounds[-1]).tolist(),
                               "tau": [round(t, 6) for t in taus] if taus is not None else None}
        if self.transfer is not None and self.transfer.numel():
            w, o = self.transfer.max(dim=1)
            rec["nearest_old_class"] = {str(n): [int(c), round(float(x), 4)]
                                        for n, c, x in zip(ctx.state.new, o.tolist(), w.tolist())}
        return rec

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        """State 0: the base's loss. Later: the base's terms with SIR's loss (``sir``) on the
        base's class logits in place of its classification term (LUCIR's less-forget and margin
        ranking terms, PODNet's POD distillation kept; fine-tuning has no other)."""
        terms = self.base.loss(ctx, batch, out)
        if ctx.state.index == 0:
            return terms
        targets = None
        if self.transfer is not None and ctx.state.n_old > 0:
            targets = inheritance_targets(batch.y, ctx.state.n_seen, ctx.state.n_old, self.transfer,
                                          self.cfg.transfer_weight)
        sir = sir_loss(self.base.class_logits(ctx, out), batch.y, self.offsets, targets)
        return {("sir" if name == self.classification_term else name): (sir if name == self.classification_term else t)
                for name, t in terms.items()}
