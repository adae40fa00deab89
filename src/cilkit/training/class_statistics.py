"""The class statistics every run saves after each state (``stats/state_XX.json``), so that any
finished run can be rectified later without its model (``cilkit calibrate``): IL2M's initial
class means, model confidences and current class means (Belouadah & Popescu, ICCV 2019,
Sec. 3), and the per-class training counts of class prediction scaling (Belouadah et al. 2020).

The runner calls :func:`state_statistics` once per state, after ``after_state``, with the
state's final model (the one whose test logits are stored) and the :class:`TrainingRecord` of
what the state actually trained on: no hook is called again to reconstruct it. The history
(``init_mean`` of earlier classes, ``conf`` of earlier states) comes from the previous state's
statistics, which the runner keeps in memory and in every checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cilkit.cil.classwise import class_counts, class_means
from cilkit.cil.rectify import ClassStatistics, nonpositive_classes

if TYPE_CHECKING:
    from cilkit.training.protocol import Context, TrainingRecord

def own_logit_means(logits: torch.Tensor, positions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes,) mean of ``z_c(x)`` over the images ``x`` of each class ``c`` (the logit of an
    image's own class); NaN for a class without images. Float64."""
    own = logits.double().gather(1, positions[:, None])
    return class_means(own, positions, n_classes)[:, 0]


def _floats(values: torch.Tensor, classes: range) -> dict[str, float | None]:
    """Class position -> value, NaN written as null (JSON has no NaN)."""
    return {str(c): (None if v != v else float(v)) for c, v in zip(classes, values[classes.start : classes.stop].tolist())}


def _history(previous: ClassStatistics | None, old: range, b: int) -> tuple[dict[str, float | None], list[float | None]]:
    """``init_mean`` of the old classes and ``conf`` of the earlier states from the previous
    state's statistics; nulls where there are none (the rectifiers leave those unchanged)."""
    if previous is None:
        return {str(o): None for o in old}, [None] * b
    return {str(o): previous["init_mean"].get(str(o)) for o in old}, list(previous["conf"])[:b]


def state_statistics(ctx: "Context", record: "TrainingRecord", previous: ClassStatistics | None) -> ClassStatistics:
    """The class statistics of state ``b`` with the state's final model:

    * ``init_mean[c]``: mean raw logit ``z_c(x)`` over the training images of class c, in the
      state where c is new (``record.new_images``: all of the state's new images, the annotated
      ones in active IL), carried unchanged to later states;
    * ``conf[b]``: mean of ``max_j z_j(x)`` over those same new-class images (model confidence);
    * ``cur_mean[o]`` for each old class o: mean ``z_o(x)`` over o's exemplars as this state
      trained on them (``record.old_exemplars``; IL2M's ``batch<b>_old`` lists); null when o
      has none;
    * ``train_counts[j]`` / ``train_total``: ``n_j`` and ``N`` over the images the state's last
      round trained on (the training set whose counts class prediction scaling asks for);
    * ``nonpositive_cur_mean``: the old classes whose current mean is <= 0, where IL2M's factor
      flips the sign of their scores (empty when none).
    """
    st = ctx.state
    pos_of = ctx.scenario.train_pos
    counts = class_counts(pos_of[record.rounds[-1]], st.n_seen)

    new_pos = pos_of[record.new_images]
    new_idx = record.new_images[(new_pos >= st.new.start) & (new_pos < st.new.stop)]
    old_idx = record.old_exemplars
    logits = _train_logits(ctx, torch.cat([new_idx, old_idx]))
    z_new, z_old = logits[: new_idx.numel()], logits[new_idx.numel() :]
    old_counts = class_counts(pos_of[old_idx], st.n_seen)
    cur_mean = own_logit_means(z_old, pos_of[old_idx], st.n_seen)

    init_old, conf = _history(previous, st.old, st.index)
    conf_b = float(z_new.max(dim=1).values.mean()) if z_new.shape[0] else None
    return {
        "state": st.index,
        "classes_seen": st.n_seen,
        "n_old": st.n_old,
        "state_ends": list(ctx.scenario.ends[: st.index + 1]),
        "init_mean": {**init_old, **_floats(own_logit_means(z_new, pos_of[new_idx], st.n_seen), st.new)},
        "conf": [*conf, conf_b],
        "cur_mean": _floats(cur_mean, st.old),
        "cur_mean_images": {str(o): int(old_counts[o]) for o in st.old},
        "nonpositive_cur_mean": nonpositive_classes(cur_mean[: st.n_old]),
        "train_counts": {str(c): int(counts[c]) for c in st.seen},
        "train_total": int(counts.sum()),
    }


def _train_logits(ctx: "Context", indices: torch.Tensor) -> torch.Tensor:
    if indices.numel() == 0:
        return torch.zeros(0, ctx.state.n_seen, dtype=torch.float64)
    out = ctx.engine.infer(ctx.model, ctx.dataset.train, indices, want_features=False)
    return out["logits"].double()
