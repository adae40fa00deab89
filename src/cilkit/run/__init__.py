"""One class-incremental run (many runs are :mod:`cilkit.runs`).

- ``loop``: :class:`~cilkit.run.loop.Run`, the state loop (before -> train -> memory -> after
  -> statistics -> evaluate -> record), and nothing else;
- ``setup``: what a run is built from (device, threads, normalisation, the method and model,
  the scenario) and :func:`~cilkit.run.setup.check_protocol`, which builds what can fail first;
- ``store``: :class:`~cilkit.run.store.RunStore`, everything a run writes and reads back
  (results.json, checkpoints, memory, scores, class statistics, provenance, history and
  TensorBoard fan-out), through the run directory's names and readers (:mod:`cilkit.rundir`);
- ``history``, ``tensorboard``, ``wandb_log``, ``provenance``: the run's records;
- ``state0cache``: the state-0 model cache, keyed on declared inputs (:mod:`cilkit.settings.keys`).

May import: the top-level modules (config, keys, engine, memory, scenario, ...),
``cilkit.data``, ``cilkit.models``, ``cilkit.methods``, ``cilkit.rundir``, and of
``cilkit.analysis`` the pieces that draw or group (``plots`` for TensorBoard's figures,
``runsets`` for the wandb group of a protocol); never ``cilkit.runs``.
Nothing imports it but ``cilkit.runs`` and the command line.
"""
