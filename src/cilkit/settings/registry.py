"""The registries of the names a config may use: methods, backbones and data sources.

Plain dicts, filled by the ``register_*`` decorators below: by the built-in methods
(``@register`` in :mod:`cilkit.methods`), backbones (:mod:`cilkit.models.backbones`) and
readers (:mod:`cilkit.data`), and by a user's plugins (``cilkit run --plugin FILE``, see
:mod:`cilkit.settings.plugins`). This module imports nothing of cilkit, so that :mod:`cilkit.settings.config` can
check names against them without importing the methods or readers (which import the config).
``import cilkit`` imports every built-in method, backbone and reader (see ``cilkit/__init__.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from cilkit.common.errors import UserError, described

if TYPE_CHECKING:
    from pydantic import BaseModel


# name -> a cilkit.training.protocol.Method subclass (typed loosely: the protocol imports the config,
# which imports this module, so this module names no cilkit type)
METHODS: dict[str, Any] = {}
SOURCES: dict[str, Callable[[Any], Any]] = {}  # data.name -> reader(DataConfig) -> Dataset
SOURCE_DESCRIPTIONS: dict[str, str] = {}
SOURCE_OPTIONS: dict[str, type["BaseModel"]] = {}  # data.name -> the model of its data.options
BACKBONES: dict[str, Callable[..., Any]] = {}  # model.backbone -> factory(in_channels=, ...)
BACKBONE_DESCRIPTIONS: dict[str, str] = {}

R = Callable[[Any], Any]
F = TypeVar("F", bound=Callable[..., Any])

BACKBONE_ARGS = ("in_channels",)  # every backbone factory takes these
# passed when the factory names them; last_relu=False (features that can be negative, what
# LUCIR's cosine and PODNet's classifiers ask for) is refused by a factory without it
BACKBONE_OPTIONAL_ARGS = ("image_size", "width", "last_relu")


MethodT = TypeVar("MethodT", bound=type)


def register_method(name: str) -> Callable[[MethodT], MethodT]:
    """Decorator: register a :class:`~cilkit.training.protocol.Method` subclass under ``name``."""

    def wrap(cls: MethodT) -> MethodT:
        _check_free(name, METHODS, "method")
        setattr(cls, "name", name)
        METHODS[name] = cls
        return cls

    return wrap


def register_source(name: str, description: str, options: type["BaseModel"] | None = None) -> Callable[[R], R]:
    """Decorator: register a data reader ``reader(cfg: DataConfig) -> Dataset`` under ``name``
    (with a one-line description for ``cilkit info``). ``options``: a pydantic model of the
    reader's own keys, given under ``data.options`` and validated with the config; the reader
    reads them with ``cfg.source_options(options)``."""

    def wrap(reader: R) -> R:
        _check_free(name, SOURCES, "data source")
        SOURCES[name] = reader
        SOURCE_DESCRIPTIONS[name] = description
        if options is not None:
            SOURCE_OPTIONS[name] = options
        return reader

    return wrap


def register_backbone(name: str, description: str) -> Callable[[F], F]:
    """Decorator: register a backbone factory under ``name`` (with a one-line description for
    ``cilkit info``). The factory is called with the keyword ``in_channels``, plus
    ``image_size`` (the side of the images the model sees), ``width`` (``model.width``) and
    ``last_relu`` (False: no ReLU after the last block, for LUCIR's and PODNet's classifiers)
    when its signature names them, and returns an ``nn.Module`` mapping ``(N, C, H, W)`` images
    to ``(N, out_dim)`` features, with an int attribute ``out_dim``."""

    def wrap(factory: F) -> F:
        _check_free(name, BACKBONES, "backbone")
        params = inspect.signature(factory).parameters
        missing = [a for a in BACKBONE_ARGS if a not in params]
        if missing:
            raise TypeError(f"backbone '{name}': the factory must take {' and '.join(BACKBONE_ARGS)} "
                            f"(missing {', '.join(missing)})")
        BACKBONES[name] = factory
        BACKBONE_DESCRIPTIONS[name] = description
        return factory

    return wrap


def call_plugin(fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    """Call a registered reader or backbone factory. One that a plugin registered (defined
    outside cilkit) and that raises is one ``UserError`` line naming ``what``; cilkit's own keep
    their tracebacks (a bug of ours, not a mistake of the user's)."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        if fn.__module__.startswith("cilkit."):
            raise
        raise UserError(f"{what} failed ({described(e)})") from None


def _check_free(name: str, table: dict[str, Any], kind: str) -> None:
    if name in table:
        raise ValueError(f"{kind} '{name}' is registered twice")
