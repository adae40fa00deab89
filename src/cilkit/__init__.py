"""cilkit: class-incremental learning under imbalance."""

__version__ = "0.1.0"
