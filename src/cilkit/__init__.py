"""cilkit: class-incremental learning under imbalance."""

import os

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning. With libgomp's default spin-wait, two runs
# that share a machine's cores wait on each other's spinning threads and slow down many times
# over (benchmarks/bench_concurrent.py). Set before torch is first imported, so it has no
# effect in a process that imported torch before cilkit; a policy the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Fill the registries (cilkit.settings.registry) with the built-in methods and data readers.
from cilkit import data as _data  # noqa: E402,F401
from cilkit import methods as _methods  # noqa: E402,F401
