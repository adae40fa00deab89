"""Method registry: ``@register("name")`` on a :class:`~cilkit.methods.base.Method` subclass.

Importing this package imports every module and sub-package of it (found with :mod:`pkgutil`,
in name order), so that each ``@register`` line runs: a new method is one new file here, listed
nowhere else.
"""

from __future__ import annotations

import importlib
import pkgutil

from cilkit.settings.registry import METHODS
from cilkit.settings.registry import register_method as register

__all__ = ["METHODS", "register"]

for _found in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_found.name}")
