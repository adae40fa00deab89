"""How a state's budgets split, shared by the methods that spend them and by the compute estimate
of ``cilkit reproduce --list`` (:mod:`cilkit.runs.reproduce`, which may not import a method):
BiC's validation hold-out per class, active CIL's annotation budget and its cycles."""

from __future__ import annotations

import math


def validation_size(share: int, ratio: float) -> int:
    """BiC's validation images per class for an old-class memory share ``share``: ``floor(ratio *
    share)``, at least 1 and at most ``share`` (0 when ``share`` is 0)."""
    return min(share, max(1, math.floor(ratio * share)))


def annotation_budget(fraction: float, pool: int) -> int:
    """Active CIL: images to annotate in a state, ``fraction * pool`` rounded half up."""
    return min(pool, int(math.floor(fraction * pool + 0.5)))


def cycle_budgets(total: int, cycles: int, first_share: float) -> list[int]:
    """Split ``total`` over ``cycles``: ``first_share`` in the first, the rest evenly (one
    cycle: everything); each cycle gets the difference of consecutive half-up-rounded cumulative
    shares, so the parts sum to ``total`` exactly (100 -> 40, 20, 20, 20; 22 -> 9, 4, 5, 4)."""
    if cycles == 1:
        return [total]
    rest = (1.0 - first_share) / (cycles - 1)
    bounds = [0] + [int(math.floor(total * (first_share + rest * r) + 0.5)) for r in range(cycles - 1)] + [total]
    return [bounds[r + 1] - bounds[r] for r in range(cycles)]
