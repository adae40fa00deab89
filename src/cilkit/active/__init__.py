"""Active class-incremental learning (Belouadah et al., 2020): the annotation oracle and the
sample acquisition functions; the method itself is ``cilkit.methods.active``."""

from cilkit.active.oracle import Oracle

__all__ = ["Oracle"]
