"""Many runs: a plan of runs (every method and seed of a config, a tuning grid, a search) and
where they execute. Each run of a plan is one :class:`~cilkit.run.loop.Run` of :mod:`cilkit.run`.

- ``multirun``: several methods and seeds into one parent directory, claimed (checked, locked)
  before anything runs and gathered after (``summary.json``);
- ``jobs``: a plan of runs (:class:`~cilkit.runs.jobs.RunJob`) and the local executors (in this
  process; ``--jobs N`` processes), with their status lines;
- ``execution``: ``--jobs`` and ``--executor`` as one value, which builds the executor of a plan;
- ``slurm``: ``--executor slurm``, one SLURM job per run through submitit (imported only then);
- ``tune``: a grid of runs ranked on validation; ``search``: ``tune --search`` with Optuna;
- ``reproduce``: ``cilkit reproduce``'s paper configs, their default seeds and the images each needs.

May import: the top-level modules, ``cilkit.data``, ``cilkit.run`` (one run), ``cilkit.rundir``
(the files it reads and claims) and of ``cilkit.analysis`` ``significance`` (mean ± std over
seeds). Nothing imports it but the command line.
"""
