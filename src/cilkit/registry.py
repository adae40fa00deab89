"""The registries of the names a config may use: methods and data sources.

Plain dicts, filled by the ``@register`` decorators of :mod:`cilkit.methods` and
:func:`register_source`; this module imports nothing of cilkit, so that :mod:`cilkit.config` can
check names against them without importing the methods or readers (which import the config).
``import cilkit`` imports every built-in method and reader (see ``cilkit/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cilkit.methods.base import Method

METHODS: dict[str, type["Method"]] = {}
SOURCES: dict[str, Callable[[Any], Any]] = {}  # data.name -> reader(DataConfig) -> Dataset
SOURCE_DESCRIPTIONS: dict[str, str] = {}

R = Callable[[Any], Any]


def register_method(name: str) -> Callable[[type["Method"]], type["Method"]]:
    """Decorator: register a :class:`~cilkit.methods.base.Method` subclass under ``name``."""

    def wrap(cls: type["Method"]) -> type["Method"]:
        if name in METHODS:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def register_source(name: str, description: str) -> Callable[[R], R]:
    """Decorator: register a data reader under ``name`` (with a one-line description for
    ``cilkit info``)."""

    def wrap(reader: R) -> R:
        if name in SOURCES:
            raise ValueError(f"data source '{name}' is registered twice")
        SOURCES[name] = reader
        SOURCE_DESCRIPTIONS[name] = description
        return reader

    return wrap
