"""A method's option, declared once: on its field in the method's ``Config`` class.

::

    class LUCIRConfig(MethodConfig):
        lambda_base: float = option(5.0, ge=0, state0=False, help="base weight of the less-forget constraint")
        quick: ClassVar[dict[str, Any]] = {"lucir.cbf_epochs": 1}

:func:`option` is a pydantic ``Field`` (the default and the constraints as ``Field`` takes
them) that also carries what the rest of cilkit derives from the option:

- ``help``: the field's ``description``, what ``cilkit info <method>`` prints and the option
  tables of README.md and docs/methods.md show (``python -m cilkit.describe --write``
  regenerates them; ``tests/test_readme.py`` checks that they are current);
- ``state0``: whether training state 0 reads it. ``False`` leaves it out of the state-0 cache
  key (:func:`state0_free`, :mod:`cilkit.run.state0cache`), so that runs differing only in it
  share one state-0 model; ``tests/test_state0_free.py`` trains state 0 with each such option
  changed and checks that the model is the same;
- ``role`` and ``resume``: what :mod:`cilkit.settings.keys` says of the key ``<method>.<option>``
  (an identity of the run that a resume must keep, by default).

A field declared without :func:`option` (a plugin's plain ``Field``) reads as the safe
default: read in state 0, kept on resume, described by its ``description`` if any.

Every config model (the run config's sections, a method's ``Config``) derives from
:class:`StrictNumbers`: a number is a number there (:func:`number_refusal`), and a reader's
``data.options`` model, a plugin's plain ``BaseModel``, is held to the same rule where it is
validated.

A method's ``Config`` may also declare ``quick``, a ``ClassVar`` of ``--set`` keys (dotted, any
run-config key) and values that make the method run the quickstart in seconds (fewer epochs
of an extra stage, a smaller budget): the tests parametrised over the registry run every
method with them.

This module imports nothing of cilkit.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

RoleName = Literal["protocol", "identity", "execution", "none"]  # the values of cilkit.settings.keys.Role
Resume = Literal["keep", "warn", "free"]  # keep: a resume must not change it; warn: may, with a warning; free: may


@dataclass(frozen=True)
class Declaration:
    """What an option declares besides its type, default and constraints."""

    help: str = ""
    role: RoleName = "identity"
    state0: bool = True  # read while state 0 trains
    resume: Resume = "keep"


UNDECLARED = Declaration()  # a field not made with option(): read in state 0, kept on resume


def option(
    default: Any = PydanticUndefined,
    *,
    help: str,
    state0: bool = True,
    resume: Resume = "keep",
    role: RoleName = "identity",
    default_factory: Callable[[], Any] | None = None,
    **constraints: Any,
) -> Any:
    """A config field with its declaration (see the module's docstring). ``default`` or
    ``default_factory`` and ``constraints`` (``ge``, ``gt``, ``le``, ``lt``, ...) are pydantic's;
    ``help`` is required and not empty."""
    if not help.strip():
        raise ValueError("option(): help must say what the option does")
    if role not in get_args(RoleName):
        raise ValueError(f"option(): role must be one of {get_args(RoleName)} (got {role!r})")
    if resume not in get_args(Resume):
        raise ValueError(f"option(): resume must be one of {get_args(Resume)} (got {resume!r})")
    extra: dict[str, Any] = {"role": role, "state0": state0, "resume": resume}
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=extra, **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def is_declared(field: FieldInfo) -> bool:
    """Whether the field was made with :func:`option`."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and {"role", "state0", "resume"} <= extra.keys()


def declaration(field: FieldInfo) -> Declaration:
    """A field's declaration (:data:`UNDECLARED`, with its description, for a plain field)."""
    extra = field.json_schema_extra
    if not is_declared(field) or not isinstance(extra, dict):
        return Declaration(help=field.description or "")
    # option() checked the values
    return Declaration(help=field.description or "", role=cast(RoleName, extra["role"]),
                       state0=bool(extra["state0"]), resume=cast(Resume, extra["resume"]))


def declarations(config: type[BaseModel]) -> dict[str, Declaration]:
    """Every option of ``config`` with its declaration, in field order."""
    return {name: declaration(field) for name, field in config.model_fields.items()}


def state0_free(config: type[BaseModel]) -> frozenset[str]:
    """The options of ``config`` that state 0 does not read (declared ``state0=False``)."""
    return frozenset(name for name, d in declarations(config).items() if not d.state0)


def quick(config: type[BaseModel]) -> dict[str, Any]:
    """The config's ``quick`` settings (dotted run-config keys), ``{}`` when it declares none."""
    value = getattr(config, "quick", None)
    return dict(value) if isinstance(value, dict) else {}


# ----- numbers are numbers ------------------------------------------------------------------------
_UNIONS = (Union, types.UnionType)
_SEQUENCES = (list, tuple, set, frozenset)


def _arms(annotation: Any) -> list[Any]:
    """The types a value of ``annotation`` may be: the arms of a union (``Optional`` included),
    ``Annotated`` unwrapped, each once."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _arms(get_args(annotation)[0])
    if origin in _UNIONS:
        return [arm for arg in get_args(annotation) for arm in _arms(arg)]
    return [annotation]


def _literal_values(arm: Any) -> tuple[Any, ...]:
    return get_args(arm) if get_origin(arm) is Literal else ()


def _takes_bool(arms: list[Any]) -> bool:
    return any(arm in (bool, Any, object) or isinstance(arm, typing.TypeVar)
               or any(isinstance(v, bool) for v in _literal_values(arm)) for arm in arms)


def _takes_number(arms: list[Any]) -> bool:
    return any(arm in (int, float) or any(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in _literal_values(arm)) for arm in arms)


def _item_annotations(arms: list[Any], value: Any) -> list[Any]:
    """The annotations the items of ``value`` (a list or a mapping) are validated against."""
    items: list[Any] = []
    for arm in arms:
        origin, args = get_origin(arm), get_args(arm)
        if isinstance(value, dict) and origin is dict and len(args) == 2:
            items.append(args[1])
        elif isinstance(value, _SEQUENCES) and origin in _SEQUENCES and args:
            items.extend(a for a in args if a is not Ellipsis)
    return items


FLOAT32_MAX = 3.4028234663852886e38  # training computes in float32 (at most): a larger setting is infinite there


def _non_finite(value: Any, arms: list[Any]) -> bool:
    """A float infinity or NaN (or the text of one, which pydantic reads as a float) given
    where a number is expected and no text is; a float beyond float32's range counts too (it
    is infinite in the tensors it reaches: ``train.lr=1e300`` overflowed inside the optimiser)."""
    if isinstance(value, str) and str not in arms:
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not abs(value) <= FLOAT32_MAX and _takes_number(arms)


def number_refusal(annotation: Any, value: Any) -> str | None:
    """Why ``value`` may not stand for a field typed ``annotation``, or None. pydantic's lax
    mode takes ``true`` for 1 and ``.inf``/``nan`` for a float; no setting means either. A
    boolean is refused where the type takes a number and no boolean, an infinity or NaN where
    it takes a number; the items of a list or mapping are checked against their type. An int
    for a float and a numeric string (``--set train.lr=1e-3``: YAML reads ``1e-3`` as text) pass."""
    arms = _arms(annotation)
    if isinstance(value, bool):
        return f"expected a number, not the boolean {value}" if _takes_number(arms) and not _takes_bool(arms) else None
    if _non_finite(value, arms):
        return (f"expected a finite number, got {value}" if not math.isfinite(float(value))
                else f"{value} is beyond float32's range (3.4e38): infinite in training")
    items = _item_annotations(arms, value) if isinstance(value, (dict, *_SEQUENCES)) else []
    if not items:
        return None
    entries = value.items() if isinstance(value, dict) else enumerate(value)
    for k, item in entries:
        refusals = [number_refusal(a, item) for a in items]
        if all(r is not None for r in refusals):  # no arm takes it
            return f"{refusals[0]} (item {k!r})"
    return None


def refuse_loose_numbers(model: type[BaseModel], data: Any, prefix: str) -> None:
    """Raise ``ValueError`` (:func:`number_refusal`'s line, naming the key ``<prefix>.<field>``)
    for the first field of ``data`` that is no number where ``model`` expects one: the check
    of :class:`StrictNumbers` for a model that does not derive from it (a plugin's options)."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        field = model.model_fields.get(str(name))
        refusal = number_refusal(field.annotation, value) if field is not None else None
        if refusal is not None:
            raise ValueError(f"config key '{prefix}.{name}': {refusal}")


class StrictNumbers(BaseModel):
    """The base of every config model: where a field expects a number, ``true`` and ``false``,
    infinities and NaN are refused (:func:`number_refusal`), in one line naming the key."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        refusal = number_refusal(field.annotation, value) if field is not None else None
        if refusal is not None:
            raise ValueError(refusal)
        return value
