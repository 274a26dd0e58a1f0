"""Intervals and paired tests agree with scipy (and with textbook formulas) on constructed data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, bootstrap, norm

from mka_exp.report import stats


def planted_gap(n: int = 1000, gap: int = 100, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """B right on about half; A = B plus `gap` examples B got wrong (a gap of gap/n)."""
    rng = np.random.default_rng(seed)
    b = rng.random(n) < 0.5
    a = b.copy()
    a[np.flatnonzero(~b)[:gap]] = True
    return a, b


def scipy_paired_ci(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    def diff(x, y, axis=-1):
        return x.mean(axis=axis) - y.mean(axis=axis)

    res = bootstrap(
        (a.astype(float), b.astype(float)),
        diff,
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=10_000,
        random_state=123,
    )
    return res.confidence_interval.low, res.confidence_interval.high


def test_identical_outcomes_p_one_interval_zero():
    a, _ = planted_gap()
    result = stats.paired(a, a)
    assert result.p_value == 1.0 and (result.a_only, result.b_only) == (0, 0)
    d = result.difference
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0) and not result.significant


def test_planted_ten_point_gap_is_significant_and_matches_scipy():
    a, b = planted_gap()
    result = stats.paired(a, b)
    assert result.difference.value == pytest.approx(0.1) and result.significant
    assert result.p_value == pytest.approx(2 * 0.5**100) and result.p_value < 1e-20
    low, high = scipy_paired_ci(a, b)
    assert result.difference.low == pytest.approx(low, abs=0.004)
    assert result.difference.high == pytest.approx(high, abs=0.004)
    reverse = stats.paired(b, a)
    assert reverse.difference.value == pytest.approx(-0.1) and reverse.significant


def test_noisy_difference_matches_scipy_and_mcnemar_formula():
    rng = np.random.default_rng(7)
    a, b = rng.random(500) < 0.55, rng.random(500) < 0.5  # independent: many discordant pairs
    result = stats.paired(a, b)
    low, high = scipy_paired_ci(a, b)
    assert result.difference.low == pytest.approx(low, abs=0.006)
    assert result.difference.high == pytest.approx(high, abs=0.006)
    n10, n01 = int((a & ~b).sum()), int((b & ~a).sum())
    assert (result.a_only, result.b_only) == (n10, n01)
    exact = min(1.0, 2 * binom.cdf(min(n10, n01), n10 + n01, 0.5))
    assert result.p_value == pytest.approx(exact, rel=1e-9)


def test_mcnemar_exact_small_cases():
    assert stats.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert stats.mcnemar_exact(10, 0) == stats.mcnemar_exact(0, 10)
    assert stats.mcnemar_exact(5, 5) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0


def test_wilson_matches_the_score_formula():
    correct = np.r_[np.ones(62), np.zeros(138)]
    interval = stats.wilson(correct)
    n, p, z = 200, 0.31, norm.ppf(0.975)
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert interval.value == pytest.approx(0.31)
    assert (interval.low, interval.high) == pytest.approx((centre - half, centre + half), rel=1e-9)
    assert interval.n == 200 and interval.excludes(0.25) is False


def naive_macro_bootstrap(correct, groups, n_resamples, seed):
    """The two-stage bootstrap by explicit index resampling (slow, obviously right)."""
    rng = np.random.default_rng(seed)
    members = [correct[groups == g] for g in np.unique(groups)]
    reps = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(members), len(members))
        reps.append(np.mean([rng.choice(members[i], members[i].size).mean() for i in drawn]))
    return np.quantile(reps, [0.025, 0.975])


def test_macro_interval_equals_index_resampling():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(12), rng.integers(3, 15, 12))
    skill = rng.random(12)[groups]  # subjects differ: the interval must carry that spread
    correct = rng.random(groups.size) < skill
    interval = stats.macro_interval(correct, groups, n_resamples=4000)
    means = [correct[groups == g].mean() for g in range(12)]
    assert interval.value == pytest.approx(np.mean(means))
    low, high = naive_macro_bootstrap(correct, groups, 4000, seed=9)
    assert interval.low == pytest.approx(low, abs=0.02)
    assert interval.high == pytest.approx(high, abs=0.02)
    pooled = stats.wilson(correct)  # ignoring subjects understates the uncertainty
    assert interval.high - interval.low > pooled.high - pooled.low


def test_paired_macro_difference():
    a, b = planted_gap(n=600, gap=60)
    groups = np.arange(600) % 6
    result = stats.paired(a, b, groups)
    means = [a[groups == g].mean() - b[groups == g].mean() for g in range(6)]
    assert result.difference.value == pytest.approx(np.mean(means)) and result.significant
    one_group = stats.paired(a, b, np.zeros(600))  # nothing to resample between groups
    plain = stats.paired(a, b)
    assert one_group.difference.value == pytest.approx(plain.difference.value)
    assert one_group.difference.low == pytest.approx(plain.difference.low, abs=0.01)
    assert stats.paired(b, b, groups).difference.high == 0.0


def test_bad_outcomes_are_one_clear_error():
    with pytest.raises(ValueError, match="outcomes must be 0 or 1, got 2"):
        stats.wilson([0, 1, 2])
    with pytest.raises(ValueError, match="equal lengths, got 3 and 2"):
        stats.paired([0, 1, 1], [1, 0])
