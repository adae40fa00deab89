"""cilkit: class-incremental learning under imbalance."""

__version__ = "0.1.0"

# Fill the registries (cilkit.registry) with the built-in methods and data readers.
from cilkit import data as _data  # noqa: E402,F401
from cilkit import methods as _methods  # noqa: E402,F401
