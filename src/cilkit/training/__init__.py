"""The hook protocol and the one training step: ``protocol`` (Context, Batch, FitSpec, FitHooks,
the Method base: what a method is written against), ``engine`` (the optimiser, the teacher's
forward, the loss's named terms, the step; batched inference) and ``class_statistics`` (a
state's statistics from what it trained on).

May import: ``cilkit.common``, ``cilkit.settings``, ``cilkit.cil``, ``cilkit.data``, ``cilkit.models``
(``protocol`` never the engine).
"""
