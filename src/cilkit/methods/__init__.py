"""Method registry: ``@register("name")`` on a :class:`~cilkit.methods.base.Method` subclass.

Importing this package imports every built-in method file, so that its ``@register`` line runs.
"""

from __future__ import annotations

from cilkit.registry import METHODS
from cilkit.registry import register_method as register

from cilkit.methods import active, bic, eeil, finetune, gdumb, icarl, il2m, joint, lucir, lwf, podnet, scail, sir, ssil, wa  # isort: skip

__all__ = ["METHODS", "register", "active", "bic", "eeil", "finetune", "gdumb", "icarl", "il2m", "joint", "lucir", "lwf", "podnet", "scail", "sir", "ssil", "wa"]
