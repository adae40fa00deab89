"""Running: one class-incremental run and many of them.

- ``loop``: :class:`~cilkit.run.loop.Run`, the state loop (before -> train -> memory -> after
  -> statistics -> evaluate -> record), and nothing else;
- ``setup``: what a run is built from (device, threads, normalisation, the method and model,
  the scenario) and :func:`~cilkit.run.setup.check_protocol`, which builds what can fail first;
- ``store``: :class:`~cilkit.run.store.RunStore`, everything a run writes and reads back
  (results.json, checkpoints, memory, scores, class statistics, provenance, history and
  TensorBoard fan-out);
- ``layout``: the file names of a run directory, its lock and who owns it; ``readers``: the
  checked reads of its files;
- ``history``, ``tensorboard``, ``provenance``: the run's records;
- ``state0cache``: the state-0 model cache, keyed on declared inputs (:mod:`cilkit.keys`);
- ``multirun``: several methods and seeds into one parent directory;
- ``tune``: a grid of runs ranked on validation.

May import: the top-level modules (config, keys, engine, memory, scenario, ...),
``cilkit.data``, ``cilkit.models``, ``cilkit.methods``, and of ``cilkit.analysis`` the pieces
that draw or summarise (``significance`` for summary.json, ``plots`` for TensorBoard's
figures). Nothing outside this package imports it but the command line and, for the file
names it reads, ``cilkit.analysis`` (``run.layout``, ``run.readers``).
"""
