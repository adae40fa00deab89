"""cilkit: class-incremental learning under imbalance."""

__version__ = "0.1.0"

# How idle OpenMP threads wait: spinning when the run has the cores alone, sleeping when other
# processes of cilkit share them (--jobs, torchrun past the cores, another run on the machine:
# spinning threads of two runs slow both down many times over, benchmarks/bench_concurrent.py).
# Chosen before torch is first imported (libgomp reads it then), so it has no effect in a
# process that imported torch before cilkit; a policy the user set is kept (cilkit.common.omp).
from cilkit.common import omp as _omp

_omp.apply()

# Fill the registries (cilkit.settings.registry) with the built-in methods and data readers.
from cilkit import data as _data  # noqa: E402,F401
from cilkit import methods as _methods  # noqa: E402,F401
