"""User-caused errors: one clear line, exit status 2, no traceback.

Also the text every "unknown name" error shares (:func:`did_you_mean`, :func:`unknown_name`:
the closest known names, and for the registries' names the plugin hint) and the one line of a
pydantic validation error (:func:`first_error`), so that a typo reads the same everywhere.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

PLUGIN_HINT = "is it in a plugin? pass --plugin FILE"


class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt file, bad label).

    The CLI prints ``error: <message>`` and exits with status 2. The message must name the
    config key, file or line at fault.
    """


class RunDiverged(UserError):
    """Training went non-finite: the epoch mean of a loss term, or a parameter after an epoch, is
    NaN or infinite. The engine raises it at the first such epoch with where it happened
    (``record``: the 1-based ``state``, ``round`` and ``epoch``, the ``stage``, the ``term`` —
    ``"parameters"`` when the loss stayed finite — and its ``value``); the run adds who diverged
    and what to try (``method``, ``seed``, ``message``), writes the record to its
    ``diverged.json`` and stops, its finished states kept. Exit status 2, as every UserError."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = dict(record)
        super().__init__(record.get("message") or divergence_text(record))


def divergence_text(record: dict[str, Any]) -> str:
    """Where a run diverged, as a :class:`RunDiverged` record says it: ``state 2, train epoch 1:
    the loss term 'kd' is nan (it had reached 3.1e+11; 'ce' went with it)`` (``round 2`` after
    the state when the round is not the first)."""
    rnd = record.get("round")
    where = f"state {record.get('state')}" + (f" round {rnd}" if isinstance(rnd, int) and rnd > 1 else "")
    term, also, peak = record.get("term"), record.get("also"), record.get("peak")
    what = "the parameters are" if term == "parameters" else f"the loss term '{term}' is"
    grew = f"it had reached {peak:.3g}" if isinstance(peak, (int, float)) and peak > 0 else ""
    with_it = f"{', '.join(repr(n) for n in also)} went with it" if isinstance(also, list) and also else ""
    notes = "; ".join(n for n in (grew, with_it) if n)
    return (f"{where}, {record.get('stage')} epoch {record.get('epoch')}: {what} {record.get('value')}"
            + (f" ({notes})" if notes else ""))


def reason(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (its type name when it has none), at most ``limit``
    characters: the cause part of a ``UserError``."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def described(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, for causes whose type tells the user something."""
    return f"{type(e).__name__}: {reason(e, limit)}"


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """``did you mean 'icarl'?`` naming the known names closest to ``name`` (difflib; each
    written after ``prefix``), or '' when none is close: a typo is one look away from its fix."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def unknown_name(kind: str, name: str, known: Iterable[str], plugin: bool = False) -> str:
    """The one line of a name no table holds: ``unknown method 'icrl': did you mean 'icarl'?
    (known: ...; is it in a plugin? pass --plugin FILE)``. ``plugin``: the name could come from
    a plugin (a registry's methods, datasets, backbones)."""
    names = sorted(set(known))
    hint = did_you_mean(name, names)
    listed = f"known: {', '.join(names)}" + (f"; {PLUGIN_HINT}" if plugin else "")
    return f"unknown {kind} {name!r}" + (f": {hint}" if hint else "") + f" ({listed})"


def first_error(e: Any, prefix: str = "", model: Any = None, kinds: dict[str, str] | None = None) -> str:
    """The first error of a pydantic ``ValidationError`` as one line naming the dotted key.
    ``model``: the model validated, whose fields name the keys an unknown key may be a typo of;
    ``kinds``: what a dotted key's allowed values are called (``memory.selection``: a selection
    strategy), for the line of a value outside them."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent = key[: -len(str(err["loc"][-1]))]  # "memory." of "memory.totl"
        hint = did_you_mean(str(err["loc"][-1]), _fields_at(model, err["loc"][:-1]), prefix=parent)
        return f"unknown key '{key}'" + (f": {hint}" if hint else "")
    if err["type"] == "missing":
        return f"missing key '{key}'"
    if not key or msg.startswith(("unknown key", "missing key", "config key")):
        return msg
    got = err.get("input")
    allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
    if err["type"] == "literal_error" and isinstance(got, str) and allowed:
        return f"config key '{key}': {unknown_name((kinds or {}).get(key, 'value'), got, allowed)}"
    said = got is None or isinstance(got, (dict, list)) or repr(got) in msg  # "unknown method 'x'" names it
    suffix = "" if said else f" (got {got!r})"
    return f"config key '{key}': {msg}{suffix}"


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (sub-)model of ``model`` at ``loc`` ([] where there is none)."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
    fields = getattr(model, "model_fields", None)
    return list(fields) if isinstance(fields, dict) else []
