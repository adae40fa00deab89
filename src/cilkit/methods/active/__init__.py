"""Active class-incremental learning for imbalanced datasets (Belouadah, Popescu, Aggarwal &
Saci, 2020), the one method that needs more than one file: the method (``method.py``, the
hooks), the annotation oracle that alone holds the pool's labels (``oracle.py``), and the sample
acquisition functions (``acquisition.py``, pure functions of model outputs).

May import: the top-level modules, ``cilkit.data``, ``cilkit.models``, ``cilkit.methods.base``.
"""

from cilkit.methods.active.method import ActiveConfig, ActiveIL
from cilkit.methods.active.oracle import Oracle

__all__ = ["ActiveConfig", "ActiveIL", "Oracle"]
