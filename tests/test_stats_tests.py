"""Mean ± std, Student's t quantile and paired intervals, against values computed by hand."""

import math

import pytest

from cilkit.analysis.significance import betainc, mean_std, paired_interval, t_cdf, t_quantile


def test_mean_and_sample_std():
    mean, std = mean_std([2.0, 4.0, 9.0])  # deviations -3, -1, 4: squares sum 26, / (3 - 1)
    assert mean == 5.0 and std == pytest.approx(math.sqrt(13.0), abs=1e-12)
    assert mean_std([7.5]) == (7.5, None)


def test_incomplete_beta_matches_a_binomial_sum():
    # I_x(a, n-a+1) = P(Binomial(n, x) >= a): I_0.4(2, 3) = 6*.4^2*.6^2 + 4*.4^3*.6 + .4^4
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    assert betainc(2, 3, 0.9) == pytest.approx(1 - 0.1 ** 4 - 4 * 0.9 * 0.1 ** 3, abs=1e-12)


@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_quantile_matches_the_tables(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=5e-5)
    assert t_quantile(0.025, df) == pytest.approx(-t, abs=5e-5)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_quantile_is_exact_where_a_closed_form_exists():
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)  # the normal limit


def test_paired_interval_by_hand():
    # differences 1, 2, 3: mean 2, sample std 1; half width t_{.975,2} / sqrt(3) = 4.302653 / 1.732051
    i = paired_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert (i.pairs, i.mean) == (3, 2.0)
    assert (i.low, i.high) == (pytest.approx(2 - 2.484138, abs=1e-6), pytest.approx(2 + 2.484138, abs=1e-6))
    assert i.verdict("finetune") == "not distinguishable from finetune"
    # differences 3, 4, 5, 4: mean 4, std sqrt(2/3), half width t_{.975,3} * std / 2 = 3.182446 * 0.408248 = 1.299228
    i = paired_interval([13.0, 14.0, 15.0, 14.0], [10.0] * 4)
    assert i.low == pytest.approx(4 - 1.299228, abs=1e-6) and i.verdict("finetune") == "better"
    # differences -2, -2.1: mean -2.05, std 0.0707107, half width 12.706205 * 0.05 = 0.635310
    i = paired_interval([1.0, 2.9], [3.0, 5.0])
    assert i.high == pytest.approx(-2.05 + 0.635310, abs=1e-6) and i.verdict("x") == "worse"
    one = paired_interval([1.0], [3.0])
    assert (one.pairs, one.mean, one.low) == (1, -2.0, None) and one.verdict("x") == "n/a (needs ≥ 2 shared seeds)"
