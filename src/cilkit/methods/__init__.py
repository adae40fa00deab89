"""Method registry: ``@register("name")`` on a :class:`~cilkit.methods.base.Method` subclass.

Importing this package imports every built-in method file, so that its ``@register`` line runs.
"""

from __future__ import annotations

from cilkit.registry import METHODS
from cilkit.registry import register_method as register

from cilkit.methods import active, bic, finetune, icarl, il2m, joint, lucir, podnet, sir  # isort: skip

__all__ = ["METHODS", "register", "active", "bic", "finetune", "icarl", "il2m", "joint", "lucir", "podnet", "sir"]
