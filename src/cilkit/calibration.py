"""Post-hoc score rectification: IL2M and class prediction scaling, live or over stored scores.

Three parts:

* **Class statistics**, saved after every state of every run (``stats/state_XX.json``) by
  :func:`save_state_statistics`, the runner's hook, so that any finished run can be rectified
  later without its model: the statistics of IL2M (initial class means, model confidences,
  current class means) and the per-class training counts of class prediction scaling.
* **Rectifiers**, pure functions of a score matrix: :func:`il2m_rectify`,
  :func:`prediction_scaling` (and ``none``, the identity).
* **Offline calibration** (``cilkit calibrate``): :func:`calibrate_run` reads the stored test
  logits and statistics of a finished run, rectifies them state by state and writes the same
  results.json (built with :mod:`cilkit.metrics`, as the runner builds its own).

Which images the statistics use. The runner updates the memory *before* ``after_state`` (see
``cilkit.methods.base``), so when the statistics are computed each old class's share has already
shrunk to its quota for the next state. The statistics use the memory *as the state's training
saw it* (:func:`training_memory`): the old-class exemplars of IL2M's original code (its
``batch<b>_old`` lists are the old images trained on in state b) and the training set whose
counts class prediction scaling asks for. The model is the final model of the state (after
``after_state``), the one whose test logits are stored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cilkit import io
from cilkit.classwise import class_counts, class_means
from cilkit.errors import UserError
from cilkit.memory import Memory, class_quotas
from cilkit.metrics import run_summary, score_metrics, state_accuracies
from cilkit.report import find_runs

if TYPE_CHECKING:
    from cilkit.methods.base import Context, Method

RECTIFIERS = ("il2m", "scaling", "none")
Stats = dict[str, Any]
FloatsOrNone = torch.Tensor | Sequence[float | None]


# ----- class statistics ------------------------------------------------------------------------
def stats_path(run_dir: Path, b: int) -> Path:
    return Path(run_dir) / "stats" / f"state_{b:02d}.json"


def training_memory(ctx: "Context") -> Memory:
    """The memory as state ``ctx.state`` trained on it: the same priority lists with the quotas
    of the previous state (every class then seen was old), i.e. before this state's update."""
    view = Memory(ctx.memory.cfg)
    view.ranking = ctx.memory.ranking
    view.quotas = class_quotas(ctx.memory.cfg.total, ctx.memory.cfg.per_class, ctx.state.n_old)
    return view


def own_logit_means(logits: torch.Tensor, positions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes,) mean of ``z_c(x)`` over the images ``x`` of each class ``c`` (the logit of an
    image's own class); NaN for a class without images. Float64."""
    own = logits.double().gather(1, positions[:, None])
    return class_means(own, positions, n_classes)[:, 0]


def _train_logits(ctx: "Context", indices: torch.Tensor) -> torch.Tensor:
    if indices.numel() == 0:
        return torch.zeros(0, ctx.state.n_seen, dtype=torch.float64)
    out = ctx.engine.infer(ctx.model, ctx.dataset.train, indices, want_features=False)
    return out["logits"].double()


def _floats(values: torch.Tensor, classes: range) -> dict[str, float | None]:
    """Class position -> value, NaN written as null (JSON has no NaN)."""
    return {str(c): (None if v != v else float(v)) for c, v in zip(classes, values[classes.start : classes.stop].tolist())}


def _previous_history(ctx: "Context") -> tuple[dict[str, float | None], list[float | None]]:
    """``init_mean`` of the old classes and ``conf`` of the earlier states, from the previous
    state's statistics file (the run directory carries this history, so a resumed run reads
    exactly what the uninterrupted run wrote). A run whose earlier states saved no statistics
    gets nulls: the rectifiers then leave those classes unchanged."""
    b = ctx.state.index
    prev = stats_path(ctx.run_dir, b - 1) if b > 0 and ctx.run_dir is not None else None
    if prev is None or not prev.is_file():
        return {str(o): None for o in ctx.state.old}, [None] * b
    data = json.loads(prev.read_text())
    return {str(o): data["init_mean"].get(str(o)) for o in ctx.state.old}, list(data["conf"])[:b]


def state_statistics(ctx: "Context", method: "Method") -> Stats:
    """The class statistics of state ``b`` with the state's final model (IL2M, Belouadah &
    Popescu, ICCV 2019, Sec. 3; class prediction scaling, Belouadah et al. 2020):

    * ``init_mean[c]``: mean raw logit ``z_c(x)`` over the training images of class c, computed
      in the state where c is new (``method.memory_candidates``: all of the state's new images,
      the annotated ones in active IL) and carried unchanged to later states;
    * ``conf[b]``: mean of ``max_j z_j(x)`` over those same new-class images (model confidence);
    * ``cur_mean[o]`` for each old class o: mean ``z_o(x)`` over o's exemplars as trained on in
      this state (:func:`training_memory`); null when o has none;
    * ``train_counts[j]`` / ``train_total``: ``n_j`` and ``N`` over ``method.train_set`` with
      that memory (the exemplars + new images of the state). ``train_set`` is called once more
      after training, with the state's last round, so it must not draw or annotate anew.
    """
    st = ctx.state
    pos_of = ctx.scenario.train_pos
    memory = training_memory(ctx)
    trained_pos = pos_of[method.train_set(dataclasses.replace(ctx, memory=memory))]
    counts = class_counts(trained_pos, st.n_seen)

    candidates = method.memory_candidates(ctx)
    new_pos = pos_of[candidates]
    new_idx = candidates[(new_pos >= st.new.start) & (new_pos < st.new.stop)]
    old_idx = memory.indices(st.old)
    logits = _train_logits(ctx, torch.cat([new_idx, old_idx]))
    z_new, z_old = logits[: new_idx.numel()], logits[new_idx.numel() :]
    old_counts = class_counts(pos_of[old_idx], st.n_seen)

    init_old, conf = _previous_history(ctx)
    conf_b = float(z_new.max(dim=1).values.mean()) if z_new.shape[0] else None
    return {
        "state": st.index,
        "classes_seen": st.n_seen,
        "n_old": st.n_old,
        "state_ends": list(ctx.scenario.ends[: st.index + 1]),
        "init_mean": {**init_old, **_floats(own_logit_means(z_new, pos_of[new_idx], st.n_seen), st.new)},
        "conf": [*conf, conf_b],
        "cur_mean": _floats(own_logit_means(z_old, pos_of[old_idx], st.n_seen), st.old),
        "cur_mean_images": {str(o): int(old_counts[o]) for o in st.old},
        "train_counts": {str(c): int(counts[c]) for c in st.seen},
        "train_total": int(counts.sum()),
    }


def save_state_statistics(ctx: "Context", method: "Method") -> Stats:
    """The runner's hook (after ``after_state``, before evaluation): compute the state's class
    statistics and write them atomically to ``stats/state_XX.json``."""
    stats = state_statistics(ctx, method)
    if ctx.run_dir is not None:
        io.write_json(stats_path(ctx.run_dir, ctx.state.index), stats)
    return stats


def load_state_statistics(run_dir: Path, b: int) -> Stats:
    """``stats/state_XX.json`` of a run; missing or unreadable -> ``UserError`` naming it."""
    path = stats_path(run_dir, b)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' not found (class statistics of state {b + 1}; runs made before "
                        "cilkit saved statistics cannot be rectified)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' cannot be read: {e}") from None


# ----- rectifiers ------------------------------------------------------------------------------
def _as_tensor(values: FloatsOrNone) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.double()
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


def il2m_factors(
    init_mean: FloatsOrNone, cur_mean: FloatsOrNone, conf_now: float | None, conf_of_old_class: FloatsOrNone
) -> torch.Tensor:
    """(n_old,) IL2M factors ``(init_mean[o] / cur_mean[o]) * (conf[b] / conf[s(o)])``; 1 where
    a statistic is missing (null/NaN) or a denominator is 0, so that class stays unchanged."""
    now = float("nan") if conf_now is None else float(conf_now)
    factors = (_as_tensor(init_mean) / _as_tensor(cur_mean)) * (now / _as_tensor(conf_of_old_class))
    return torch.where(torch.isfinite(factors), factors, torch.ones_like(factors))


def il2m_rectify(
    logits: torch.Tensor,
    n_old: int,
    init_mean: FloatsOrNone,
    cur_mean: FloatsOrNone,
    conf_now: float | None,
    conf_of_old_class: FloatsOrNone,
) -> torch.Tensor:
    """IL2M score rectification (Belouadah & Popescu, ICCV 2019, Sec. 3, the rectified
    prediction equation), on raw logits ``(N, n_seen)`` whose first ``n_old`` columns are the
    old classes:

        z'_o = z_o * (init_mean[o] / cur_mean[o]) * (conf[b] / conf[s(o)])   for every old o,

    only for the rows whose top-1 class is new; other rows, and every new-class score, are left
    as they are. ``conf_of_old_class[o]`` is ``conf[s(o)]``, the confidence of the state where o
    was new. As in the original code (``il2m/codes/il2m.py``), the factor multiplies the raw
    score whatever its sign. Returns a new tensor of the logits' dtype.
    """
    if n_old == 0 or logits.shape[0] == 0:
        return logits.clone()
    factors = il2m_factors(init_mean, cur_mean, conf_now, conf_of_old_class).to(logits.device)
    top_is_new = (logits.argmax(dim=1) >= n_old)[:, None]
    old = logits[:, :n_old].double()
    rectified = torch.where(top_is_new, old * factors[None, :], old).to(logits.dtype)
    return torch.cat([rectified, logits[:, n_old:]], dim=1)


def prediction_scaling(logits: torch.Tensor, counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Class prediction scaling (Belouadah, Popescu, Aggarwal & Kanellos, "Active class
    incremental learning for imbalanced datasets", 2020): ``p = softmax(z)``, then
    ``p'_j = p_j * N / n_j`` where ``n_j > 0`` (``n_j`` training images of class j in the
    state, ``N = sum_j n_j``) and ``p'_j = p_j`` where ``n_j = 0``. Scaled probabilities, not
    renormalised (only their order matters)."""
    n = torch.as_tensor(counts, dtype=torch.float64).to(logits.device)
    p = torch.softmax(logits.double(), dim=1)
    scale = torch.where(n > 0, n.sum() / n.clamp_min(1), torch.ones_like(n))
    return (p * scale[None, :]).to(logits.dtype)


def il2m_from_stats(logits: torch.Tensor, stats: Stats) -> torch.Tensor:
    """:func:`il2m_rectify` with one state's saved statistics."""
    n_old = int(stats["n_old"])
    conf = stats["conf"]
    ends = torch.tensor(stats["state_ends"])
    born = torch.bucketize(torch.arange(n_old), ends, right=True).tolist()  # s(o): o < ends[s(o)]
    return il2m_rectify(
        logits,
        n_old,
        [stats["init_mean"].get(str(o)) for o in range(n_old)],
        [stats["cur_mean"].get(str(o)) for o in range(n_old)],
        conf[int(stats["state"])],
        [conf[s] for s in born],
    )


def scaling_from_stats(logits: torch.Tensor, stats: Stats) -> torch.Tensor:
    """:func:`prediction_scaling` with one state's saved training counts."""
    counts = [stats["train_counts"].get(str(c), 0) for c in range(logits.shape[1])]
    return prediction_scaling(logits, counts)


def check_rectifier(rectifier: str) -> None:
    if rectifier not in RECTIFIERS:
        raise UserError(f"calibrate --with: unknown rectifier '{rectifier}' (choose one of {', '.join(RECTIFIERS)})")


def rectify(rectifier: str, logits: torch.Tensor, stats: Stats | None) -> torch.Tensor:
    """Apply the named rectifier (``il2m``, ``scaling`` or ``none``) to one state's logits."""
    check_rectifier(rectifier)
    if rectifier == "il2m":
        return il2m_from_stats(logits, stats or {})
    if rectifier == "scaling":
        return scaling_from_stats(logits, stats or {})
    return logits


# ----- offline calibration ---------------------------------------------------------------------
def _load_scores(run_dir: Path, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = run_dir / "scores" / f"state_{b:02d}.npz"
    try:
        with np.load(path) as npz:
            return torch.from_numpy(npz["logits"]), torch.from_numpy(npz["labels"]).long()
    except FileNotFoundError:
        raise UserError(f"'{path}' not found (stored scores of state {b + 1})") from None
    except KeyError as e:
        raise UserError(f"'{path}' has no {e} array (not a cilkit scores file)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' cannot be read: {e}") from None


def calibrated_results(run_dir: Path, source: dict[str, Any], rectifier: str) -> tuple[dict[str, Any], dict[int, dict]]:
    """The results.json of ``source`` (a run's results) with every state's test logits
    rectified, and the arrays to store per state. Reads, writes nothing."""
    check_rectifier(rectifier)
    ends = source["state_ends"]
    out = {k: v for k, v in source.items() if k not in ("states", "accuracy_matrix")}
    out.update(method=f"{source.get('method', '?')}+{rectifier}",
               primary_scores="cnn" if rectifier == "none" else rectifier,
               calibration={"rectifier": rectifier, "source": str(run_dir), "source_method": source.get("method")},
               states=[], accuracy_matrix=[])
    arrays: dict[int, dict] = {}
    for entry in source["states"]:
        b = int(entry["state"])
        logits, labels = _load_scores(run_dir, b)
        stats = load_state_statistics(run_dir, b) if rectifier != "none" else None
        n_old = ends[b - 1] if b > 0 else 0
        scores = rectify(rectifier, logits, stats)
        metrics = score_metrics(scores, labels, n_old, ends[: b + 1])
        out["accuracy_matrix"].append(metrics.pop("accuracy_per_state"))
        variants = {} if rectifier == "none" else {"cnn": state_accuracies(logits, labels, n_old)}
        out["states"].append({**entry, **metrics, "variants": variants})
        arrays[b] = {"logits": logits.numpy(), "labels": labels.numpy(), "scores": scores.numpy()}
    out.update(run_summary(out["states"], out["accuracy_matrix"]))
    out["complete"] = bool(source.get("complete"))
    return out, arrays


def calibrate_run(run_dir: Path, rectifier: str, out: Path | None = None, echo: bool = True) -> dict[str, Any]:
    """``cilkit calibrate``: rectify the stored test logits of a finished run with ``rectifier``
    (``il2m``, ``scaling`` or ``none``) and write results.json and ``scores/state_XX.npz`` into
    ``out`` (default ``RUN_DIR/calibrated/<rectifier>``). A parent of method sub-directories
    gets one output per method (``<out>/<method>`` or ``RUN_DIR/<method>/calibrated/...``).
    Loads no model and no checkpoint; every input is read before anything is written.
    Returns ``{label: results}`` (label ``""`` for a single run)."""
    check_rectifier(rectifier)
    run_dir = Path(run_dir)
    single = (run_dir / "results.json").is_file()
    done = []
    for run in find_runs([run_dir]):
        results, arrays = calibrated_results(run.path, run.results, rectifier)
        base = Path(out) if out is not None else run.path / "calibrated" / rectifier
        dest = base / run.path.name if (not single and out is not None) else base
        done.append(("" if single else run.label, dest, results, arrays))
    for _, dest, results, arrays in done:
        for b, arr in arrays.items():
            io.write_npz(dest / "scores" / f"state_{b:02d}.npz", **arr)
        io.write_json(dest / "results.json", results)
        if echo:
            print(f"{results['method']}: mean incremental top-1 (excl. state 1) "
                  f"{_fmt(results.get('mean_incremental_top1_excl_first'))} -> {dest}")
    return {label: results for label, _, results, _ in done}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
