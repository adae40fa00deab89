"""The checked readers of a run's files: a missing, foreign, damaged or newer-version file is one
:class:`~cilkit.common.errors.UserError` naming it (and the field), never a traceback. A NaN or
infinite number (in results.json, class statistics, score arrays) is refused the same way, naming
the key or array: what a diverged run left is never read as a result. A run whose training
diverged has ``diverged.json`` (:func:`read_divergence`) instead of results.json."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cilkit.common.errors import UserError

RESULTS_VERSION = 2  # of results.json; a newer one is refused by read_results
# 2: a method's own results of a state sit under its name (states[b]["lucir"], ["active"] ...)

_RUN_KEYS = ("state_ends", "class_order")
_STATE_KEYS = ("state", "classes_seen", "new_classes", "top1", "top1_old", "top1_new", "new_class_share")


def read_json(path: Path, what: str) -> Any:
    """A JSON file; missing or unreadable -> ``UserError`` naming it and ``what`` it holds."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' not found ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' cannot be read ({what}): {e}") from None


def read_results(path: Path) -> dict[str, Any]:
    """A run's results.json, checked: a foreign file, one missing a key the report needs, one
    whose lists and objects are of another kind (:func:`_check_shapes`) or whose values are not
    what the report and calibrate read (:func:`_check_values`), or one written by a newer cilkit
    (``version`` above :data:`RESULTS_VERSION`) is refused, naming the file and the field."""
    data = read_json(path, "not a cilkit run directory")
    if not isinstance(data, dict) or not isinstance(data.get("states"), list):
        raise UserError(f"'{path}' is not a cilkit results file (no 'states' list)")
    version = data.get("version", 1)
    if not isinstance(version, int) or version > RESULTS_VERSION:
        raise UserError(f"'{path}' was written by a newer cilkit (results version {version}; this one "
                        f"reads up to {RESULTS_VERSION}): upgrade cilkit to read it")
    missing = [k for k in _RUN_KEYS if k not in data]
    if missing:
        raise UserError(f"'{path}' is not a cilkit results file: no '{missing[0]}'")
    _check_shapes(path, data)
    missing = [f"states[{b}].{k}" for b, s in enumerate(data["states"]) for k in _STATE_KEYS if k not in s]
    if missing:
        raise UserError(f"'{path}' is not a cilkit results file: no '{missing[0]}'")
    _check_values(path, data)
    _check_finite_numbers(path, data)
    return _renamed_variants(data)


# score sets (``variants``) renamed since a run was made: ``(method, old name) -> name``, so that
# runs made before read as today's (a group of old and new runs keeps one row per score set)
RENAMED_VARIANTS = {("active", "cnn"): "unscaled"}  # active CIL's raw logits beside its scaled scores


def _renamed_variants(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the score sets of :data:`RENAMED_VARIANTS` under their names of today."""
    method = str(data.get("method"))
    for state in data["states"]:
        if state.get("variants"):
            state["variants"] = {RENAMED_VARIANTS.get((method, k), k): v for k, v in state["variants"].items()}
    return data


_RUN_SHAPES: tuple[tuple[str, type, str], ...] = (
    ("state_ends", list, "a list"), ("class_order", list, "a list"),
    ("calibration", dict, "an object"), ("provenance", dict, "an object"),
)


def _damaged(path: Path, key: str, problem: str) -> UserError:
    """``'<path>' is damaged: '<key>' <problem>``: the one line naming the file and the field."""
    return UserError(f"'{path}' is damaged: '{key}' {problem}")


def _non_finite(path: Path, key: str, what: str) -> UserError:
    """The one line refusing a NaN or infinite value of ``key`` (a field or an array)."""
    return UserError(f"'{path}' holds a non-finite value: '{key}' {what} (a run whose training diverged, or a "
                     "damaged file): it is not read as a result")


def _check_finite_numbers(path: Path, data: Any, where: str = "") -> None:
    """Refuse the first NaN or infinite number anywhere in ``data`` (a JSON file's contents:
    Python's json reads ``NaN`` and ``Infinity``), naming its key (``states[1].top1``)."""
    if isinstance(data, float) and not math.isfinite(data):
        raise _non_finite(path, where, f"is {data}")
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        _check_finite_numbers(path, value, f"{where}[{key}]" if isinstance(key, int) else
                              f"{where}.{key}" if where else str(key))


def _check_shapes(path: Path, data: dict[str, Any]) -> None:
    """Refuse a results.json whose containers are not what the report reads: ``states`` a list
    of objects, each one's ``variants`` an object of objects, ``state_ends`` and
    ``class_order`` lists, ``calibration`` and ``provenance`` (when there) objects."""
    for key, kind, what in _RUN_SHAPES:
        if key in data and not isinstance(data[key], kind):
            raise _damaged(path, key, f"is not {what}")
    for b, state in enumerate(data["states"]):
        if not isinstance(state, dict):
            raise _damaged(path, f"states[{b}]", "is not an object")
        variants = state.get("variants", {})
        if not isinstance(variants, dict):
            raise _damaged(path, f"states[{b}].variants", "is not an object")
        for name, figures in variants.items():
            if not isinstance(figures, dict):
                raise _damaged(path, f"states[{b}].variants.{name}", "is not an object")


# ----- the values of results.json ---------------------------------------------------------------
# a state's figures (and those of its score sets, ``variants``): a number or null each
_STATE_FIGURES = ("top1", "top5", "top1_old", "top1_new", "balanced_top1", "new_class_share",
                  "val_top1", "val_balanced_top1", "time_s")
_RUN_FIGURES = ("average_forgetting", "wall_time_s")  # and every ``mean_incremental_*``


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_figure(value: Any) -> bool:
    """A number, or null for a figure without a value (no old classes yet, ...)."""
    return value is None or _is_number(value)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _check_values(path: Path, data: dict[str, Any]) -> None:
    """Refuse a results.json whose values are not what the report and calibrate read (after
    :func:`_check_shapes` and the check for missing keys): the protocol
    (:func:`_check_protocol`), each state (:func:`_check_state`), the accuracy matrix and the
    run's summaries (numbers or null)."""
    ends = _check_protocol(path, data)
    for b, state in enumerate(data["states"]):
        _check_state(path, b, state, ends)
    _check_matrix(path, data)
    for key, value in data.items():
        if (key in _RUN_FIGURES or key.startswith("mean_incremental_")) and not _is_figure(value):
            raise _damaged(path, key, "is not a number (or null)")


def _check_protocol(path: Path, data: dict[str, Any]) -> list[int]:
    """``state_ends`` increasing positive integers, one per state (``num_states``, when there:
    a positive integer); ``class_order`` integers, at least as many as the classes of the last
    state; no more ``states`` than ``state_ends``. Returns ``state_ends``."""
    ends = data["state_ends"]
    if not ends or not _is_int_list(ends) or ends[0] < 1 or any(a >= b for a, b in zip(ends, ends[1:])):
        raise _damaged(path, "state_ends", "is not a list of increasing positive integers")
    num_states = data.get("num_states", len(ends))
    if not _is_int(num_states) or num_states < 1:
        raise _damaged(path, "num_states", "is not a positive integer")
    if len(ends) != num_states:
        raise _damaged(path, "state_ends", f"has {len(ends)} entries, not num_states ({num_states})")
    order = data["class_order"]
    if not _is_int_list(order):
        raise _damaged(path, "class_order", "is not a list of integers")
    if len(order) < ends[-1]:
        raise _damaged(path, "class_order", f"has {len(order)} classes, fewer than the {ends[-1]} of 'state_ends'")
    if len(data["states"]) > len(ends):
        raise _damaged(path, "states", f"has {len(data['states'])} entries, more than 'state_ends' ({len(ends)})")
    return ends


def _check_state(path: Path, b: int, state: dict[str, Any], ends: list[int]) -> None:
    """State ``b``: ``state`` is ``b``, ``classes_seen`` is ``state_ends[b]``, ``new_classes``
    integers, every figure (its own and its score sets') a number or null."""
    where = f"states[{b}]"
    if not _is_int(state["state"]) or state["state"] != b:
        raise _damaged(path, f"{where}.state", f"is not {b} (its place in 'states')")
    if not _is_int(state["classes_seen"]) or state["classes_seen"] != ends[b]:
        raise _damaged(path, f"{where}.classes_seen", f"is not {ends[b]} (state_ends[{b}])")
    if not _is_int_list(state["new_classes"]):
        raise _damaged(path, f"{where}.new_classes", "is not a list of integers")
    _check_figures(path, where, state)
    for name, figures in state.get("variants", {}).items():
        _check_figures(path, f"{where}.variants.{name}", figures)


def _check_figures(path: Path, where: str, figures: dict[str, Any]) -> None:
    for key in _STATE_FIGURES:
        if key in figures and not _is_figure(figures[key]):
            raise _damaged(path, f"{where}.{key}", "is not a number (or null)")


def _check_matrix(path: Path, data: dict[str, Any]) -> None:
    """``accuracy_matrix`` (when there): one row per state, row ``b`` ``b + 1`` numbers or null."""
    if "accuracy_matrix" not in data:
        return
    matrix, n = data["accuracy_matrix"], len(data["states"])
    if not isinstance(matrix, list):
        raise _damaged(path, "accuracy_matrix", "is not a list")
    if len(matrix) != n:
        raise _damaged(path, "accuracy_matrix", f"has {len(matrix)} rows, not one per state ({n})")
    for b, row in enumerate(matrix):
        if not isinstance(row, list) or len(row) != b + 1 or not all(_is_figure(v) for v in row):
            raise _damaged(path, f"accuracy_matrix[{b}]", f"is not a list of {b + 1} numbers (or null)")


def read_scores(path: Path, *keys: str) -> list[np.ndarray]:
    """The named arrays of a stored ``scores/state_XX.npz`` (object arrays refused), each
    checked for non-finite values (:func:`_check_finite_array`)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [npz[k] for k in keys]
    except FileNotFoundError:
        raise UserError(f"'{path}' not found (the run's stored test scores)") from None
    except KeyError as e:
        raise UserError(f"'{path}' has no {e} array (not a cilkit scores file)") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"'{path}' cannot be read: {e.__class__.__name__}: {e}") from None
    for key, array in zip(keys, arrays):
        _check_finite_array(path, key, array)
    return arrays


def _check_finite_array(path: Path, key: str, array: np.ndarray) -> None:
    """Refuse NaN or infinity in a float array; a score set (``scores``, ``scores_<name>``) may
    hold ``-inf``, a class it cannot predict (NME without a class mean, ScaIL's unkept old classes)."""
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    scores = key == "scores" or key.startswith("scores_")
    bad = np.isnan(array) | (np.isposinf(array) if scores else ~np.isfinite(array))
    if bad.any():
        raise _non_finite(path, key, f"holds {int(bad.sum())} NaN or infinite value(s) of {array.size}")


def read_state_scores(path: Path, n_seen: int) -> tuple[np.ndarray, np.ndarray]:
    """A state's stored test ``logits`` and ``labels`` (``scores/state_XX.npz``), checked
    against the ``n_seen`` classes of the state: numeric logits of one row per image and at
    least one column per class seen, one integer label per row, each a class seen."""
    logits, labels = read_scores(path, "logits", "labels")
    if logits.ndim != 2 or logits.dtype.kind not in "fiu":
        raise _damaged(path, "logits", "is not a numeric array of one row per image")
    if logits.shape[1] < n_seen:
        raise _damaged(path, "logits", f"has {logits.shape[1]} columns, fewer than the {n_seen} classes seen")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise _damaged(path, "labels", "is not an integer array of one label per image")
    if len(labels) != len(logits):
        raise _damaged(path, "labels", f"has {len(labels)} entries for the {len(logits)} rows of 'logits'")
    if labels.size and (labels.min() < 0 or labels.max() >= n_seen):
        raise _damaged(path, "labels", f"has values outside the {n_seen} classes seen")
    return logits, labels


def _npz_keys(path: Path) -> list[str]:
    """The array names of an npz file; none when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (OSError, ValueError, EOFError):
        return []


def read_state_classifier(path: Path, n_seen: int, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A state's stored test ``features`` and linear classifier (``head_weight``, ``head_bias``),
    which runs of a method that keeps them store (``Method.stores_features``: fine-tuning and
    the methods built on it), checked: one feature row per test image, one classifier row and
    bias per class seen, the classifier's width the features'."""
    keys = ("features", "head_weight", "head_bias")
    try:
        features, weight, bias = read_scores(path, *keys)
    except UserError:
        stored = _npz_keys(path)
        missing = [k for k in keys if k not in stored]
        if not missing or not {"logits", "labels"} <= set(stored):
            raise  # missing, unreadable or not a scores file: read_scores's line
        raise UserError(f"'{path}' holds no test features and classifier ({', '.join(missing)}): ScaIL needs a run of "
                        "a linear-head method that stores them (finetune, il2m, scail), made by this cilkit") from None
    if features.ndim != 2 or features.dtype.kind != "f" or len(features) != n_images:
        raise _damaged(path, "features", f"is not a float array of one row for each of the {n_images} test images")
    if weight.ndim != 2 or weight.dtype.kind != "f" or weight.shape[0] < n_seen or weight.shape[1] != features.shape[1]:
        raise _damaged(path, "head_weight", f"is not a float array of {n_seen} rows of width {features.shape[1]}")
    if bias.ndim != 1 or bias.dtype.kind != "f" or len(bias) != weight.shape[0]:
        raise _damaged(path, "head_bias", "is not a float array of one bias per row of 'head_weight'")
    return features, weight, bias


_STATS_KEYS = ("state", "n_old", "state_ends", "init_mean", "conf", "cur_mean", "train_counts")


def read_stats(path: Path, b: int, state_ends: Sequence[int] | None = None) -> dict[str, Any]:
    """A state's saved class statistics (``stats/state_XX.json``), with the keys the
    rectifiers read, checked (:func:`_check_stats`); with the run's ``state_ends``, they must
    be the statistics of state ``b`` of that protocol."""
    data = read_json(path, f"class statistics of state {b + 1}; runs made before cilkit saved "
                           "statistics cannot be rectified")
    missing = [k for k in _STATS_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"'{path}' is not a cilkit statistics file: no '{missing[0]}'")
    _check_stats(path, data, b, state_ends)
    _check_finite_numbers(path, data)
    return data


def _check_stats(path: Path, data: dict[str, Any], b: int, state_ends: Sequence[int] | None) -> None:
    """``state`` is ``b``; ``state_ends`` ``b + 1`` increasing integers (the run's, when given)
    and ``n_old`` the classes before state ``b``; ``conf`` a number or null per state so far;
    ``init_mean`` and ``cur_mean`` objects of numbers or null, ``train_counts`` of numbers."""
    if not _is_int(data["state"]) or data["state"] != b:
        raise _damaged(path, "state", f"is not {b}")
    ends = data["state_ends"]
    if state_ends is not None and ends != list(state_ends[: b + 1]):
        raise _damaged(path, "state_ends", f"is not {list(state_ends[: b + 1])} (the run's, up to state {b + 1})")
    if not _is_int_list(ends) or len(ends) != b + 1 or any(x >= y for x, y in zip(ends, ends[1:])):
        raise _damaged(path, "state_ends", f"is not a list of {b + 1} increasing integers")
    n_old = ends[b - 1] if b > 0 else 0
    if not _is_int(data["n_old"]) or data["n_old"] != n_old:
        raise _damaged(path, "n_old", f"is not {n_old}")
    conf = data["conf"]
    if not isinstance(conf, list) or len(conf) < b + 1:
        raise _damaged(path, "conf", f"is not a list of {b + 1} numbers (or null)")
    for i, value in enumerate(conf):
        if not _is_figure(value):
            raise _damaged(path, f"conf[{i}]", "is not a number (or null)")
    for key, nullable in (("init_mean", True), ("cur_mean", True), ("train_counts", False)):
        _check_per_class(path, key, data[key], nullable)


def _check_per_class(path: Path, key: str, values: Any, nullable: bool) -> None:
    """An object of class position -> number (or null, when ``nullable``)."""
    if not isinstance(values, dict):
        raise _damaged(path, key, "is not an object")
    for c, value in values.items():
        if not (_is_figure(value) if nullable else _is_number(value)):
            raise _damaged(path, f"{key}.{c}", "is not a number" + (" (or null)" if nullable else ""))


# ----- a run that diverged ----------------------------------------------------------------------
_DIVERGENCE_FIELDS: tuple[tuple[str, type, str], ...] = (
    ("method", str, "a name"), ("state", int, "a state number"), ("stage", str, "a stage name"),
    ("epoch", int, "an epoch number"), ("term", str, "a loss term's name"), ("message", str, "a line"),
)


def read_divergence(path: Path) -> dict[str, Any]:
    """The record of a run whose training went non-finite (``diverged.json``, written by the run:
    :class:`~cilkit.common.errors.RunDiverged`), checked: ``method``, the 1-based ``state`` and
    ``epoch``, the ``stage``, the ``term`` and the one-line ``message`` (``seed``: an integer or
    null)."""
    data = read_json(path, "the record of a run whose training diverged")
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a cilkit divergence record (not an object)")
    for key, kind, what in _DIVERGENCE_FIELDS:
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _damaged(path, key, f"is not {what}")
    if data.get("seed") is not None and not _is_int(data["seed"]):
        raise _damaged(path, "seed", "is not an integer (or null)")
    return data
