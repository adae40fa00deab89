"""The run directory, below both the runner and the analysis: what its files are called and
how they are read back.

- ``layout``: :class:`~cilkit.rundir.layout.RunLayout` (every path of a run directory), the
  marker that says a directory holds a run, its lock and who owns it (check, claim, clear);
- ``readers``: the checked reads of its files (results.json, scores, classifiers, class
  statistics), each turning a missing, damaged or newer-version file into one line.

May import: the top-level modules ``errors``, ``io``, ``locks``, ``distributed`` and
``registry`` (the names of methods' own directories); never ``run``, ``runs``, ``analysis``,
a method, the engine or a model. ``run``, ``runs``, ``analysis`` and the command line import it.
"""
