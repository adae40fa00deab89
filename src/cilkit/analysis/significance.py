"""Statistics over repeated runs: mean ± sample std, Student's t quantile, paired intervals.

No scipy: the t distribution's CDF is written with the regularized incomplete beta function
(a continued fraction, evaluated by the modified Lentz method) and its quantile is found by
bisection on that CDF. (``cilkit.training.class_statistics`` is something else: per-class training statistics.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95  # the confidence level of the paired intervals


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and *sample* standard deviation (ddof=1, the n-1 denominator) of ``values``; the
    std is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (Student's t, ``df`` degrees of freedom), by bisection on
    :func:`t_cdf` to full double precision."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedInterval:
    """The mean of paired differences with its two-sided confidence interval (paired t)."""

    pairs: int
    mean: float | None
    low: float | None
    high: float | None

    def verdict(self, baseline: str) -> str:
        """``better`` / ``worse`` when the interval excludes 0, else not distinguishable."""
        if self.low is None or self.high is None:
            return "n/a (needs ≥ 2 shared seeds)"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return f"not distinguishable from {baseline}"


def paired_interval(method: Sequence[float], baseline: Sequence[float], level: float = LEVEL) -> PairedInterval:
    """Mean of ``method[i] - baseline[i]`` and its ``level`` interval, mean ± t_{(1+level)/2, n-1}
    · s / sqrt(n), with s the sample std of the differences. Fewer than 2 pairs: no interval."""
    if len(method) != len(baseline):
        raise ValueError("paired_interval: the two samples differ in length")
    diffs = [m - b for m, b in zip(method, baseline)]
    n = len(diffs)
    if n < 2:
        return PairedInterval(n, diffs[0] if diffs else None, None, None)
    mean, std = mean_std(diffs)
    assert std is not None
    half = t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
    return PairedInterval(n, mean, mean - half, mean + half)
