"""Method registry: ``@register("name")`` on a :class:`~cilkit.methods.base.Method` subclass."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cilkit.methods.base import Method

METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def wrap(cls: type["Method"]) -> type["Method"]:
        if name in METHODS:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    # Import every method file so that its @register line runs.
    from cilkit.methods import (  # noqa: F401  # noqa: F401
        active,  # noqa: F401
        bic,
        finetune,
        icarl,
        il2m,  # noqa: F401
        joint,
        lucir,  # noqa: F401
        sir,
    )


_load_all()
