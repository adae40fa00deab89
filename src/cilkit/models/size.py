"""The size of a model before it is built: what a config's ``model.width`` asks of the memory.

A build on PyTorch's meta device gives the exact parameter count without allocating anything,
up to where one tensor would hold more bytes than an int64 counts (``model.width=3000000000``:
a 3x3 convolution of 8.1e19 elements). The meta device refuses such a tensor; the count is then
extrapolated from builds at small widths, through which a model's parameters are a quadratic
(a convolution of width w to width w has 9 w^2 weights, its BatchNorm 2 w).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
from torch import nn

# more bytes than one tensor may hold (its size is counted in an int64): a lower bound of the
# parameters of a model with such a tensor
INT64_BYTES = 2**63
FIT_WIDTHS = (8, 16, 32)  # the small widths the quadratic is fitted through
CHECK_WIDTH = 64  # and the one it must also meet


class TensorTooLarge(Exception):
    """A tensor of the model would hold more bytes than an int64 counts."""


def parameter_bytes(build: Callable[[], nn.Module]) -> int:
    """The bytes of the parameters of ``build()``, built on the meta device (no memory used,
    the global RNG left as it was). Raises :class:`TensorTooLarge` where one tensor is too
    large for even that; an op the meta device lacks raises what PyTorch raises."""
    state = torch.random.get_rng_state()
    try:
        with torch.device("meta"):
            model = build()
    except RuntimeError as e:
        if "size calculation overflowed" in str(e):  # c10's check of numel * itemsize in an int64
            raise TensorTooLarge(str(e)) from None
        raise
    finally:
        torch.random.set_rng_state(state)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quadratic_through(points: dict[int, int], x: int) -> Fraction:
    """The value at ``x`` of the polynomial through ``points`` (x -> y), exactly (Lagrange)."""
    total = Fraction(0)
    for xi, yi in points.items():
        term = Fraction(yi)
        for xj in points:
            if xj != xi:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return total


def model_bytes(build_at: Callable[[int], nn.Module], width: int) -> int:
    """The parameter bytes of the model ``build_at(width)`` makes, without allocating it: a meta
    build, else (a tensor too large for that) the quadratic through the sizes at
    :data:`FIT_WIDTHS`, checked at :data:`CHECK_WIDTH`; where the sizes are no quadratic in the
    width, :data:`INT64_BYTES`, the least such a model holds."""
    try:
        return parameter_bytes(lambda: build_at(width))
    except TensorTooLarge:
        pass
    points = {w: parameter_bytes(lambda: build_at(w)) for w in FIT_WIDTHS}
    if quadratic_through(points, CHECK_WIDTH) != parameter_bytes(lambda: build_at(CHECK_WIDTH)):
        return INT64_BYTES
    estimate = quadratic_through(points, width)
    return max(int(estimate), INT64_BYTES) if estimate.denominator == 1 else INT64_BYTES
