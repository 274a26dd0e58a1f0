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
    assert d.value == 0.0 and not d.excludes(0)
    assert -0.002 < d.low <= 0 <= d.high < 0.002  # Newcombe: the Wilson asymmetry, no more


def test_planted_ten_point_gap_is_significant_and_matches_scipy():
    a, b = planted_gap()
    result = stats.paired(a, b)
    assert result.difference.value == pytest.approx(0.1) and result.difference.excludes(0)
    assert result.p_value == pytest.approx(2 * 0.5**100) and result.p_value < 1e-20
    low, high = scipy_paired_ci(a, b)  # Newcombe's closed form is close to the bootstrap
    assert result.difference.low == pytest.approx(low, abs=0.01)
    assert result.difference.high == pytest.approx(high, abs=0.01)
    reverse = stats.paired(b, a)
    assert reverse.difference.value == pytest.approx(-0.1) and reverse.difference.excludes(0)


def test_noisy_difference_matches_scipy_and_mcnemar_formula():
    rng = np.random.default_rng(7)
    a, b = rng.random(500) < 0.55, rng.random(500) < 0.5  # independent: many discordant pairs
    result = stats.paired(a, b)
    low, high = scipy_paired_ci(a, b)
    assert result.difference.low == pytest.approx(low, abs=0.01)
    assert result.difference.high == pytest.approx(high, abs=0.01)
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
    assert result.difference.value == pytest.approx(np.mean(means))
    assert result.difference.excludes(0)
    one_group = stats.paired(a, b, np.zeros(600))  # nothing to resample between groups
    plain = stats.paired(a, b)
    assert one_group.difference.value == pytest.approx(plain.difference.value)
    assert one_group.difference.low == pytest.approx(plain.difference.low, abs=0.01)
    assert one_group.mde == pytest.approx(plain.mde)
    assert stats.paired(b, b, groups).difference.high == 0.0


def test_bad_outcomes_are_one_clear_error():
    with pytest.raises(ValueError, match="outcomes must be 0 or 1, got 2"):
        stats.wilson([0, 1, 2])
    with pytest.raises(ValueError, match="equal lengths, got 3 and 2"):
        stats.paired([0, 1, 1], [1, 0])


def test_newcombe_interval_is_seedless_and_covers_at_its_level():
    """Coverage of the true paired difference over 1,500 simulated 2x2 tables (n = 200)."""
    rng = np.random.default_rng(11)
    probs, truth = [0.12, 0.07, 0.55, 0.26], 0.05  # A only, B only, both, neither
    covered = 0
    for counts in rng.multinomial(200, probs, size=1500):
        low, high = stats.newcombe_paired(*counts)
        covered += low <= truth <= high
    assert 0.93 <= covered / 1500 <= 0.97
    assert stats.newcombe_paired(3, 1, 50, 46) == stats.newcombe_paired(3, 1, 50, 46)
    low, high = stats.newcombe_paired(0, 0, 50, 50)  # no discordant pair: it touches 0
    assert low <= 0 <= high


def test_an_endpoint_within_rounding_of_zero_touches_it():
    assert not stats.Interval(-0.1, -0.2, -3.9e-18, 300).excludes(0)
    assert not stats.Interval(0.1, 1e-13, 0.2, 300).excludes(0)
    assert stats.Interval(0.1, 1e-9, 0.2, 300).excludes(0)


def test_holm_matches_the_step_down_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]).size == 0


def test_mde_gives_eighty_percent_power_at_the_observed_discordance():
    """Simulated paired data whose true difference is the MDE: McNemar rejects ~80 % of the time."""
    n, discordance = 300, 0.2
    counts = np.array([[30, 30, 240]])  # 60 discordant of 300
    mde = stats.mde(counts)
    assert mde == pytest.approx(stats.z_sum() * np.sqrt(discordance / n))
    rng = np.random.default_rng(5)
    probs = [(discordance + mde) / 2, (discordance - mde) / 2, 1 - discordance]
    draws = rng.multinomial(n, probs, size=2000)
    power = np.mean([stats.mcnemar_exact(x, y) < 0.05 for x, y, _ in draws])
    assert 0.72 <= power <= 0.85  # exact McNemar is a little conservative
    assert np.isnan(stats.mde(np.array([[0, 0, 10]])))


def test_examples_for_power():
    diffs = np.r_[np.ones(30), -np.ones(10), np.zeros(60)]  # mean 0.2, sd ~0.64
    need = stats.examples_for_power(diffs)
    expected = np.ceil((stats.z_sum() * diffs.std(ddof=1) / 0.2) ** 2)
    assert need == expected and 70 < need < 90
    assert stats.examples_for_power(np.zeros(5)) == np.inf
    assert np.isnan(stats.examples_for_power([1.0]))


def test_paired_ratio_is_a_over_b_with_a_paired_bootstrap_like_scipys():
    dense, compressed = planted_gap(gap=40)  # compressed: dense less 40 right answers
    a, b = compressed, dense
    result = stats.paired_ratio(a, b)
    assert result.value == pytest.approx(a.mean() / b.mean()) and result.n == a.size
    assert result.low < result.value < result.high < 1  # paired: A never right where B is wrong

    def ratio(x, y, axis=-1):
        return x.mean(axis=axis) / y.mean(axis=axis)

    res = bootstrap((a.astype(float), b.astype(float)), ratio, paired=True, vectorized=True,
                    method="percentile", n_resamples=10_000, random_state=123)  # fmt: skip
    assert result.low == pytest.approx(res.confidence_interval.low, abs=0.005)
    assert result.high == pytest.approx(res.confidence_interval.high, abs=0.005)


def test_paired_ratio_of_macro_averages_and_of_a_zero_denominator():
    a = np.r_[1, 1, 0, 0, 1, 0]
    b = np.r_[1, 1, 1, 0, 1, 1]
    groups = np.r_[0, 0, 0, 0, 1, 1]
    result = stats.paired_ratio(a, b, groups, n_resamples=500)
    assert result.value == pytest.approx(((2 / 4) + (1 / 2)) / ((3 / 4) + 1))
    assert result.low <= result.value <= result.high
    assert np.isnan(stats.paired_ratio([1, 0], [0, 0], n_resamples=50).value)
