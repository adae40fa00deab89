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

A method's ``Config`` may also declare ``quick``, a ``ClassVar`` of ``--set`` keys (dotted, any
run-config key) and values that make the method run the quickstart in seconds (fewer epochs
of an extra stage, a smaller budget): the tests parametrised over the registry run every
method with them.

This module imports nothing of cilkit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from pydantic import BaseModel, Field
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
