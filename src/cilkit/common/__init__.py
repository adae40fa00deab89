"""What every layer of cilkit uses, the bottom of the package: one-line user errors
(``errors``), atomic writes (``io``), the lines a run prints (``runlog``), seeded generators
(``seeding``), file locks (``locks``), facts of the machine (``machine``), how idle OpenMP
threads wait (``omp``) and torchrun's processes (``distributed``).

May import: nothing of cilkit outside this package.
"""
