"""DGR, gradient reweighting with distribution-aware distillation (J. He, "Gradient Reweighting:
Towards Imbalanced Class-Incremental Learning", CVPR 2024).

Written from the paper's method section and checked line by line against the authors' code
(JiangpengHe/imbalanced_cil: ``src/approach/DGR.py``, its base ``src/approach/incremental_learning.py``
``train_loop``, ``src/datasets/data_loader.py`` ``num_per_cls_task`` and ``script/main.sh``). The
paper's equation numbers are not cited: its text was not at hand when this was written, so each
component is named as its method section names it and given as the code computes it (the
paper's numbers come from that code).

Per state, with ``n_j`` the images of class ``j`` in the state's training set (new images + the
exemplars it trains on; the authors' ``num_per_cls_task``: old classes capped at the exemplar count):

* **Regularised softmax** (against logit drift): the cross-entropy reads the logits plus the log
  prior, ``z_j + log(n_j / sum_k n_k)`` (the code's ``criterion``, in every state).
* **Intra-phase gradient reweighting** (state 0): after the backward pass, ``Phi_j`` accumulates
  the L2 norm of row ``j`` of the classifier's weight gradient over every step of the state (all
  epochs); the gradient of row ``j`` and of bias ``j`` is scaled by the class-balance ratio
  ``alpha_j = min_k Phi_k / Phi_j``.
* **Decoupled gradient reweighting** (states b >= 1): ``Phi`` accumulates the norms of the
  classifier's cross-entropy gradient alone; ``alpha`` is taken within the old classes and within
  the new ones separately, then scaled by the task-balance ratios ``r_old = min(1, mean Phi_new /
  mean Phi_old)`` and ``r_new = min(1, gamma mean Phi_new / mean Phi_old)``, with the attenuation
  ``gamma = exp(-attenuation N_old / (N_old + N_new))``, ``N_old`` the images the old classes had
  when they were learned and ``N_new`` the state's new images. The classifier's gradient becomes
  ``alpha_j g^CE_j + beta g^KD_j`` (the KD part on the old rows only), where ``beta = ||(alpha_j
  ||g^CE_j||)_j|| / ||(||g^KD_j||)_{j old}||`` balances the two per batch (the code's ``ratio_kd``).
  The backbone takes the plain gradient of ``CE + KD``.
* **Distribution-aware KD** (the code's ``_DAKD``): over the old classes' logits ``s`` (student)
  and ``t`` (teacher), with ``m_j`` the training images old class ``j`` lost (its count when
  learned minus its exemplars), ``p = m / sum(m)`` then ``p / ||p||_2``, ``rho`` the normalised
  entropy of ``m + 0.001`` (``measure_imbalance``), ``u = p s + (1 - p) t`` and
  ``KD = w T^2 mean_x sum_j -softmax(t/T)_j [rho log softmax(s/T)_j + (1 - rho) log softmax(u/T)_j]``
  with ``w = lambda_b sqrt(N_old / N_new)`` (``kd_ratio``).

Readings chosen (where the code is followed, it is because the paper's numbers come from it):

* The KD factor ``2 * 2`` of ``criterionkd`` is read as ``T^2`` with the code's ``T = 2``
  (``temperature``); ``lambda_b = 0.7`` and ``gam = 1`` are hard-coded in ``train_loop``, here options.
* The clipping of the global gradient norm (the code's ``clipgrad``, 10000) comes after the
  reweighting, as in the code: the engine's ``before_step`` hook runs between the backward pass
  and the run's ``train.clip_grad_norm``. Everything else about the optimiser (SGD, lr,
  schedule, epochs) is the run's ``train`` section; ``script/main.sh`` uses SGD 0.1, momentum 0.9,
  batch 128, 20 exemplars per class.
* Guards where the code would divide by zero (never reached on the authors' benchmarks): a
  class count of 0 (no exemplar kept) is counted as 1 in the log prior; with no lost image the
  DAKD prior is 0 (``u = t``); with one old class ``rho = 1``; ``beta = 0`` when the KD gradient
  of the classifier is 0.
* Under torchrun the classifier gradients the reweighting reads are averaged over the ranks
  (exact where the ranks' slices are equal), so every rank applies the same weights.
* Not ported: ``noise_grad`` (off by default and in every script of the authors), the balanced
  loader and the balanced finetuning (``nepochs_finetuning`` 0; never called with ``balanced``),
  the warm-up head (0 epochs).

State 0 is not fine-tuning's (log prior and gradient reweighting), so DGR keeps its own state-0
cache entries; runs that differ only in ``temperature``, ``lambda_b`` or ``attenuation`` share them.
Per state, results.json records under ``dgr``: ``train_counts`` (``n_j``); from state 1 also
``lost`` (``m_j``), ``imbalance`` (``rho``), ``gamma``, ``kd_weight`` (``w``) and ``class_weights``
(``alpha_j`` times the task-balance ratio at the state's last step). Scores: the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cilkit.cil.classwise import class_counts
from cilkit.common import distributed
from cilkit.methods.base import Batch, Context, LossTerms, Method, MethodConfig, head_of, teacher_old_logits
from cilkit.models import IncrementalLinear
from cilkit.settings.options import option
from cilkit.settings.registry import register_method as register


class DGRConfig(MethodConfig):
    temperature: float = option(2.0, gt=0, state0=False,
                                help="T of the distribution-aware KD, which is also scaled by T^2 (DGR.py criterionkd: "
                                     "_DAKD(..., 2) times 2 * 2)")
    lambda_b: float = option(0.7, ge=0, state0=False,
                             help="KD weight w = lambda_b * sqrt(N_old / N_new) (incremental_learning.py train_loop: "
                                  "lambda_b = 0.7)")
    attenuation: float = option(1.0, ge=0, state0=False,
                                help="gamma = exp(-attenuation * N_old / (N_old + N_new)), which scales the new classes' "
                                     "gradients (incremental_learning.py train_loop: gam = 1)")


# ----- the formulas ---------------------------------------------------------------------------
def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """The regularised softmax's offsets ``log(n_j / sum n)`` (counts clamped to >= 1)."""
    n = counts.double().clamp_min(1)
    return torch.log(n / n.sum()).float()


def imbalance_ratio(lost: torch.Tensor) -> float:
    """``rho``: the entropy of ``(m + 0.001) / sum``, divided by ``log`` of the number of old
    classes (``measure_imbalance``); 1 with a single old class."""
    if lost.numel() < 2:
        return 1.0
    p = lost.double() + 0.001
    p = p / p.sum()
    return float(-(p * p.log()).sum() / math.log(lost.numel()))


def dakd_prior(lost: torch.Tensor) -> torch.Tensor:
    """``p``: the lost counts normalised to sum 1, then to unit L2 norm (0 where none is lost)."""
    m = lost.double()
    if float(m.sum()) == 0.0:
        return torch.zeros_like(m, dtype=torch.float32)
    p = m / m.sum()
    return (p / p.norm()).float()


def dakd_loss(student: torch.Tensor, teacher: torch.Tensor, prior: torch.Tensor, rho: float,
              temperature: float) -> torch.Tensor:
    """Distribution-aware KD over the old classes' logits, unweighted (``_DAKD``): the teacher's
    softmax against ``rho`` times the student's log-softmax plus ``1 - rho`` times that of the
    prior-mixed logits ``p s + (1 - p) t``; summed over classes, averaged over the batch."""
    mixed = student * prior + teacher * (1 - prior)
    target = F.softmax(teacher / temperature, dim=1)
    log_p = rho * F.log_softmax(student / temperature, dim=1) + (1 - rho) * F.log_softmax(mixed / temperature, dim=1)
    return -(target * log_p).sum() / student.shape[0]


def class_weights(accumulated: torch.Tensor, n_old: int, gamma: float) -> torch.Tensor:
    """Each classifier row's gradient weight from the accumulated norms ``Phi``: ``min Phi /
    Phi_j`` over all classes (state 0, ``n_old == 0``); else within the old and the new classes
    separately, times ``r_old = min(1, mean Phi_new / mean Phi_old)`` and ``r_new = min(1,
    gamma mean Phi_new / mean Phi_old)``."""
    phi = accumulated.clamp_min(torch.finfo(accumulated.dtype).tiny)
    if n_old == 0:
        return phi.min() / phi
    old, new = phi[:n_old], phi[n_old:]
    ratio = new.mean() / old.mean()
    return torch.cat([old.min() / old * ratio.clamp(max=1.0), new.min() / new * (ratio * gamma).clamp(max=1.0)])


def kd_balance(weights: torch.Tensor, ce_norms: torch.Tensor, kd_norms: torch.Tensor) -> torch.Tensor:
    """``beta``: the norm of the reweighted CE row norms over the norm of the KD row norms of the
    old classes (``ratio_kd``); 0 when the KD gradient is 0."""
    den = kd_norms.norm()
    return torch.where(den > 0, (weights * ce_norms).norm() / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.zeros_like(den))


@dataclass(frozen=True)
class StateSetup:
    """What a state's loss and reweighting read, fixed before it trains."""

    n_old: int
    offsets: torch.Tensor  # (n_seen,) log prior of the state's class counts
    prior: torch.Tensor  # (n_old,) the DAKD prior p
    rho: float
    gamma: float
    kd_weight: float  # w = lambda_b sqrt(N_old / N_new)


def state_setup(counts: torch.Tensor, learned: torch.Tensor, cfg: DGRConfig, device: torch.device) -> StateSetup:
    """The state's constants from ``counts`` (n_seen,), its training images per class, and
    ``learned`` (n_old,), the images each old class had in the state that learned it."""
    n_old = learned.numel()
    lost = (learned - counts[:n_old]).clamp_min(0)
    n_learned, n_new = float(learned.sum()), float(counts[n_old:].sum())
    gamma = math.exp(-cfg.attenuation * n_learned / (n_learned + n_new)) if n_old else 1.0
    weight = cfg.lambda_b * math.sqrt(n_learned / max(n_new, 1.0)) if n_old else 0.0
    return StateSetup(n_old=n_old, offsets=log_prior(counts).to(device), prior=dakd_prior(lost).to(device),
                      rho=imbalance_ratio(lost), gamma=gamma, kd_weight=weight)


# ----- the method ------------------------------------------------------------------------------
@register("dgr")
class DGR(Method):
    description = ("DGR: log-prior cross-entropy, classifier gradients reweighted by accumulated per-class gradient "
                   "norms (old and new decoupled), distribution-aware distillation")
    Config = DGRConfig
    cfg: DGRConfig
    needs_teacher = True
    needs_memory = True  # the paper's protocol (the authors' code warns without exemplars)

    def __init__(self, config: Any, options: MethodConfig | None = None) -> None:
        super().__init__(config, options)
        self.setup: StateSetup | None = None
        self.accumulated: torch.Tensor | None = None  # Phi: per-class accumulated CE gradient norms
        self._pending: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    def _head(self, ctx: Context) -> IncrementalLinear:
        return head_of(ctx, IncrementalLinear, "DGR")

    def prepare(self, counts: torch.Tensor, learned: torch.Tensor, device: torch.device) -> None:
        """Fix the state's constants (:func:`state_setup`) and start ``Phi`` at 0."""
        self.setup = state_setup(counts, learned, self.cfg, device)
        self.accumulated = torch.zeros(counts.numel(), device=device)
        self._pending = None

    def begin_round(self, ctx: Context) -> None:
        st = ctx.state
        counts = class_counts(ctx.scenario.train_pos[self.train_set(ctx)], st.n_seen)
        learned = class_counts(ctx.scenario.train_pos[ctx.scenario.train_indices_of(st.old)], st.n_old)
        self.prepare(counts, learned, ctx.device)
        ctx.record.results["train_counts"] = counts.tolist()
        if st.n_old and self.setup is not None:
            ctx.record.results.update({"lost": (learned - counts[: st.n_old]).clamp_min(0).tolist(),
                                       "imbalance": self.setup.rho, "gamma": self.setup.gamma,
                                       "kd_weight": self.setup.kd_weight})

    def loss(self, ctx: Context, batch: Batch, out: dict[str, torch.Tensor]) -> LossTerms:
        """The log-prior cross-entropy and, from state 1, the weighted DAKD; the gradient of each
        with respect to the logits is kept for :meth:`before_step`."""
        s = self.setup
        assert s is not None, "DGR.loss before begin_round"
        logits = out["logits"]
        ce = F.cross_entropy(logits + s.offsets, batch.y)
        terms: LossTerms = {"ce": ce}
        old = teacher_old_logits(ctx, batch)
        kd = None
        if old is not None and s.n_old:
            kd = s.kd_weight * self.cfg.temperature ** 2 * dakd_loss(logits[:, : s.n_old], old, s.prior, s.rho,
                                                                      self.cfg.temperature)
            terms["kd"] = kd
        if logits.requires_grad:
            g_ce = torch.autograd.grad(ce, logits, retain_graph=True)[0]
            g_kd = torch.autograd.grad(kd, logits, retain_graph=True)[0] if kd is not None else None
            self._pending = (g_ce, g_kd, out["features"].detach())
        return terms

    def before_step(self, ctx: Context) -> None:
        """The classifier's gradient rewritten: ``alpha_j`` times the CE part of row ``j``, plus
        ``beta`` times the KD part on the old rows (bias alike); ``Phi`` grows by this batch's
        CE row norms first."""
        if self._pending is None or self.setup is None or self.accumulated is None:
            return
        g_ce, g_kd, feats = self._pending
        self._pending = None
        head = self._head(ctx)
        w_ce, b_ce = g_ce.t() @ feats, g_ce.sum(0)
        parts = [w_ce, b_ce] + ([g_kd.t() @ feats, g_kd.sum(0)] if g_kd is not None else [])
        if distributed.active():
            parts = [distributed.all_sum(p) / distributed.world_size() for p in parts]
        w_ce, b_ce = parts[0], parts[1]
        norms = w_ce.norm(dim=1)
        self.accumulated += norms
        n_old = self.setup.n_old if g_kd is not None else 0
        weights = class_weights(self.accumulated, n_old, self.setup.gamma)
        w_grad, b_grad = weights[:, None] * w_ce, weights * b_ce
        if g_kd is not None:
            w_kd, b_kd = parts[2], parts[3]
            beta = kd_balance(weights, norms, w_kd[:n_old].norm(dim=1))
            w_grad[:n_old] += beta * w_kd[:n_old]
            b_grad[:n_old] += beta * b_kd[:n_old]
        for param, grad in ((head.weight, w_grad), (head.bias, b_grad)):
            if param.grad is not None:
                param.grad.copy_(grad)

    def after_state(self, ctx: Context) -> None:
        """From state 1 (state 0 may come from the cache, untrained here): the last step's
        class weights in results.json."""
        if ctx.state.index > 0 and self.accumulated is not None and self.setup is not None:
            weights = class_weights(self.accumulated, self.setup.n_old, self.setup.gamma)
            ctx.record.results["class_weights"] = [round(w, 6) for w in weights.tolist()]
