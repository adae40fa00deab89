"""The class-incremental primitives, no training: the scenario (class order, states,
hold-outs, the imbalance profile and its one description: ``scenario``), the exemplar memory (``memory``), per-class sums and means
(``classwise``), the accuracy measures (``metrics``; many-, medium- and few-shot: ``shots``) and the score rectifiers (``rectify``,
pure functions over stored scores).

May import: ``cilkit.common``, ``cilkit.settings``.
"""
