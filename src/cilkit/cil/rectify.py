"""Score rectifiers: pure functions of a score matrix and class statistics.

IL2M's rectification, class prediction scaling and ScaIL's classifier, used live by the
``il2m``, ``active`` and ``scail`` methods and offline by ``cilkit calibrate`` (:mod:`cilkit.analysis.calibrate`). This module knows nothing
of runs, memories or files: the statistics come in as a dict (the content of a
``stats/state_XX.json``, see :mod:`cilkit.training.class_statistics`) or as plain sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cilkit.common.errors import UserError, unknown_name

RECTIFIERS = ("il2m", "scaling", "scail", "none")
ClassStatistics = dict[str, Any]  # a state's class statistics (cilkit.training.class_statistics)
FloatsOrNone = torch.Tensor | Sequence[float | None]


def _as_tensor(values: FloatsOrNone) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.double()
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


def nonpositive_classes(cur_mean: FloatsOrNone) -> list[int]:
    """Positions (0-based, among the old classes) whose current mean score is <= 0: there IL2M's
    factor ``init_mean / cur_mean`` has the wrong sign or no meaning."""
    cur = _as_tensor(cur_mean)
    return (cur <= 0).nonzero().flatten().tolist()


def il2m_factors(
    init_mean: FloatsOrNone,
    cur_mean: FloatsOrNone,
    conf_now: float | None,
    conf_of_old_class: FloatsOrNone,
    guard_nonpositive: bool = False,
) -> torch.Tensor:
    """(n_old,) IL2M factors ``(init_mean[o] / cur_mean[o]) * (conf[b] / conf[s(o)])``; 1 where
    a statistic is missing (null/NaN) or a denominator is 0, so that class stays unchanged.

    A non-positive current mean flips the sign of the factor; the original code and FACIL
    multiply anyway, and so does cilkit by default. ``guard_nonpositive`` leaves such classes
    unrectified (factor 1) instead."""
    now = float("nan") if conf_now is None else float(conf_now)
    cur = _as_tensor(cur_mean)
    factors = (_as_tensor(init_mean) / cur) * (now / _as_tensor(conf_of_old_class))
    keep = torch.isfinite(factors)
    if guard_nonpositive:
        keep &= cur > 0
    return torch.where(keep, factors, torch.ones_like(factors))


def il2m_rectify(
    logits: torch.Tensor,
    n_old: int,
    init_mean: FloatsOrNone,
    cur_mean: FloatsOrNone,
    conf_now: float | None,
    conf_of_old_class: FloatsOrNone,
    guard_nonpositive: bool = False,
) -> torch.Tensor:
    """IL2M score rectification (Belouadah & Popescu, ICCV 2019, Sec. 3, the rectified
    prediction equation), on raw logits ``(N, n_seen)`` whose first ``n_old`` columns are the
    old classes:

        z'_o = z_o * (init_mean[o] / cur_mean[o]) * (conf[b] / conf[s(o)])   for every old o,

    only for the rows whose top-1 class is new; other rows, and every new-class score, are left
    as they are. ``conf_of_old_class[o]`` is ``conf[s(o)]``, the confidence of the state where o
    was new. As in the original code (``il2m/codes/il2m.py``), the factor multiplies the raw
    score whatever its sign (see :func:`il2m_factors` for ``guard_nonpositive``). Returns a new
    tensor of the logits' dtype.
    """
    if n_old == 0 or logits.shape[0] == 0:
        return logits.clone()
    factors = il2m_factors(init_mean, cur_mean, conf_now, conf_of_old_class, guard_nonpositive).to(logits.device)
    top_is_new = (logits.argmax(dim=1) >= n_old)[:, None]
    old = logits[:, :n_old].double()
    rectified = torch.where(top_is_new, old * factors[None, :], old).to(logits.dtype)
    return torch.cat([rectified, logits[:, n_old:]], dim=1)


def prediction_scaling(logits: torch.Tensor, counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Class prediction scaling (Belouadah, Popescu, Aggarwal & Saci, "Active class
    incremental learning for imbalanced datasets", IPCV workshop at ECCV 2020): ``p = softmax(z)``,
    then ``p'_j = p_j * N / n_j`` where ``n_j > 0`` (``n_j`` training images of class j in the
    state, ``N = sum_j n_j``) and ``p'_j = p_j`` where ``n_j = 0``. Scaled probabilities, not
    renormalised (only their order matters)."""
    n = torch.as_tensor(counts, dtype=torch.float64).to(logits.device)
    p = torch.softmax(logits.double(), dim=1)
    scale = torch.where(n > 0, n.sum() / n.clamp_min(1), torch.ones_like(n))
    return (p * scale[None, :]).to(logits.dtype)


def born_states(n_old: int, state_ends: Sequence[int]) -> list[int]:
    """``s(o)`` for each old class position ``o``: the state whose classes end after ``o``
    (``o < state_ends[s(o)]``), whatever the size of the first state."""
    ends = torch.tensor(list(state_ends))
    return torch.bucketize(torch.arange(n_old), ends, right=True).tolist()


def il2m_from_stats(logits: torch.Tensor, stats: ClassStatistics, guard_nonpositive: bool = False) -> torch.Tensor:
    """:func:`il2m_rectify` with one state's statistics."""
    n_old = int(stats["n_old"])
    conf = stats["conf"]
    return il2m_rectify(
        logits,
        n_old,
        [stats["init_mean"].get(str(o)) for o in range(n_old)],
        [stats["cur_mean"].get(str(o)) for o in range(n_old)],
        conf[int(stats["state"])],
        [conf[s] for s in born_states(n_old, stats["state_ends"])],
        guard_nonpositive,
    )


def scaling_from_stats(logits: torch.Tensor, stats: ClassStatistics) -> torch.Tensor:
    """:func:`prediction_scaling` with one state's training counts."""
    counts = [stats["train_counts"].get(str(c), 0) for c in range(logits.shape[1])]
    return prediction_scaling(logits, counts)


def scail_classifier(
    weight: torch.Tensor, bias: torch.Tensor, first_heads: Sequence[tuple[torch.Tensor, torch.Tensor]],
    state_ends: Sequence[int], reading: str = "code",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ScaIL (Belouadah & Popescu, "ScaIL: Classifier Weights Scaling for Class Incremental
    Learning", WACV 2020), as its authors' ``scail/codes/scail.py`` computes it: the classifier
    of state ``b = len(state_ends) - 1`` (``weight`` (n_seen, D), ``bias`` (n_seen,)) with the
    rows of every old class replaced by its rows from the state ``s`` where it was learned
    (``first_heads[s]``: that state's whole head), rescaled:

    * weights: ``mu_new[k]`` is the mean over the current state's new classes of their ``k``-th
      largest ``|w|``, ``mu_s[k]`` the same over the classes of state ``s`` in ``first_heads[s]``;
      ``reading="code"`` multiplies ``w[d]`` by ``(mu_new / mu_s)[argsort(-w)[d]]`` as the
      authors' loop does; ``reading="rank"`` multiplies the ``k``-th largest ``|w|`` by
      ``(mu_new / mu_s)[k]``, the reading of rank-wise statistics (the two differ: the loop
      indexes the factors by a dimension, not by a rank). A factor whose ``mu_s[k]`` is 0 is 1.
    * biases: times ``c_b / c_s``, where ``c`` is what the code's ``sum(normalize(|bias|
      .reshape(-1, 1)))`` computes: each bias normalised as a vector of one element, so the count
      of non-zero biases of the state's head (1 where ``c_s`` is 0).

    The new classes keep the current rows. Computed in float64."""
    b = len(state_ends) - 1
    n_old, n_seen = (state_ends[b - 1] if b > 0 else 0), state_ends[b]
    w, beta = weight[:n_seen].double(), bias[:n_seen].double()
    out_w, out_b = w.clone(), beta.clone()
    mu_new = w[n_old:].abs().sort(dim=1, descending=True).values.mean(dim=0)
    count_now = (beta != 0).sum().double()
    for s in range(b):
        lo, hi = (state_ends[s - 1] if s > 0 else 0), state_ends[s]
        w0, b0 = first_heads[s][0].double(), first_heads[s][1].double()
        count_then = (b0 != 0).sum().double()
        out_b[lo:hi] = b0[lo:hi] * (count_now / count_then if count_then > 0 else 1.0)
        rows = w0[lo:hi]
        mu_s = rows.abs().sort(dim=1, descending=True).values.mean(dim=0)
        factor = torch.where(mu_s > 0, mu_new / torch.where(mu_s > 0, mu_s, torch.ones_like(mu_s)),
                             torch.ones_like(mu_s))
        if reading == "code":
            out_w[lo:hi] = rows * factor[rows.argsort(dim=1, descending=True, stable=True)]
        else:
            ranks = rows.abs().argsort(dim=1, descending=True, stable=True).argsort(dim=1)
            out_w[lo:hi] = rows * factor[ranks]
    return out_w, out_b


def scail_scores(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scaled: tuple[torch.Tensor, torch.Tensor],
    n_old: int, top_rewinded: int = 10,
) -> torch.Tensor:
    """ScaIL's test scores (its authors' ``scail.py``): ``features @ W'^T + b'`` with the classifier
    of :func:`scail_classifier`, where only the ``top_rewinded`` old classes that the current
    classifier (``weight``, ``bias``) scores highest for an image keep their score and the other
    old classes get ``-inf``; the new classes score with their current rows. Float32."""
    f = features.double()
    n_seen = scaled[0].shape[0]
    current = f @ weight[:n_seen].double().T + bias[:n_seen].double()
    out = f @ scaled[0].T + scaled[1]
    if 0 < top_rewinded < n_old:
        top = current[:, :n_old].topk(top_rewinded, dim=1).indices
        keep = torch.zeros(f.shape[0], n_old, dtype=torch.bool).scatter_(1, top, True)
        out[:, :n_old] = torch.where(keep, out[:, :n_old], torch.full_like(out[:, :n_old], float("-inf")))
    return out.float()


def check_rectifier(rectifier: str) -> None:
    if rectifier not in RECTIFIERS:
        raise UserError(f"calibrate --with: {unknown_name('rectifier', rectifier, RECTIFIERS)}")


def rectify(rectifier: str, logits: torch.Tensor, stats: ClassStatistics | None) -> torch.Tensor:
    """Apply the named rectifier (``il2m``, ``scaling`` or ``none``) to one state's logits
    (ScaIL reads more than one state's statistics: :func:`scail_classifier`)."""
    check_rectifier(rectifier)
    if rectifier == "scail":
        raise ValueError("scail rectifies from the stored features and classifiers of every state: scail_classifier")
    if rectifier == "il2m":
        return il2m_from_stats(logits, stats or {})
    if rectifier == "scaling":
        return scaling_from_stats(logits, stats or {})
    return logits
