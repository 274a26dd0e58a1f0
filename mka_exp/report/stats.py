"""Intervals and paired tests for accuracies measured on per-example records.

At 200 examples one accuracy has a standard error of about 0.035, so a table of point estimates
cannot say whether two methods differ. This module gives, from the 0/1 outcomes of
`mka_exp.results.samples`:

- `wilson`: a 95 % Wilson score interval for one accuracy (scipy's `binomtest(...).proportion_ci`).
- `macro_interval`: for a macro average over subjects (MMLU as the paper reports it), a percentile
  bootstrap that resamples subjects and, within each drawn subject, its questions.
- `paired`: method A against baseline B on the same examples: the difference of accuracies with
  Newcombe's closed-form paired interval (square-and-add of the two Wilson intervals, corrected
  for the pairs' correlation: no resampling, so no seed moves it), or for a macro average a
  paired percentile bootstrap (an example's two outcomes are resampled together, by subject and
  question); McNemar's exact p (scipy's two-sided binomial test on the discordant pairs, so it
  always pools the examples); and the minimum detectable difference (`mde`).
- `paired_ratio`: accuracy of A as a fraction of B's on the same examples (a compressed model's
  retained share of its dense model's accuracy), with a paired percentile bootstrap: each
  example's two outcomes are resampled together (for a macro average, by subject and question).
- `holm`: Holm's step-down adjustment of a family's p values.
- `mde`, `examples_for_power`: what a paired comparison can detect at 80 % power, α = 0.05.

The bootstrap draws counts, not indices: resampling n outcomes of a few kinds (right/wrong, or
A-only/B-only/same for a pair) with replacement gives multinomial counts with the observed
proportions, which is what numpy's `multinomial` draws, so 10,000 replicates of 14,000 MMLU
questions cost no memory. `tests/test_stats.py` checks it against `scipy.stats.bootstrap`.

    >>> a, b = np.r_[np.ones(60), np.zeros(40)], np.r_[np.ones(50), np.zeros(50)]
    >>> paired(a, b).difference  # 0.1, with .low/.high (bootstrap) and .p_value (McNemar)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, norm

LEVEL = 0.95
N_RESAMPLES = 10_000
SEED = 0
BATCH = 500  # replicates drawn at once (bounds memory for many subjects)
TOUCH = 1e-12  # an interval endpoint this close to a point touches it
ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Interval:
    """An estimate with its `level` interval; `n` examples behind it."""

    value: float
    low: float
    high: float
    n: int

    def excludes(self, point: float = 0.0) -> bool:
        """The interval lies wholly on one side of `point`; an endpoint within TOUCH of it (a
        float-rounding zero like -3.9e-18) touches it."""
        return self.low > point + TOUCH or self.high < point - TOUCH


@dataclass(frozen=True)
class Paired:
    """A − B on the same examples: the difference with its interval, McNemar's exact p and the
    discordant counts (`a_only`: A right and B wrong; `b_only`: the reverse) and the minimum
    detectable difference at 80 % power from n and the observed discordance."""

    difference: Interval
    p_value: float
    a_only: int
    b_only: int
    mde: float = np.nan


def as_outcomes(values: np.ndarray | list) -> np.ndarray:
    """0/1 outcomes as a bool array; anything else is an error naming the bad value."""
    array = np.asarray(values, dtype=float)
    bad = array[(array != 0) & (array != 1)]
    if bad.size:
        raise ValueError(f"outcomes must be 0 or 1, got {bad[0]:g}")
    return array.astype(bool)


def wilson(correct: np.ndarray | list, level: float = LEVEL) -> Interval:
    """The accuracy of 0/1 outcomes with its Wilson score interval."""
    correct = as_outcomes(correct)
    n, k = correct.size, int(correct.sum())
    if n == 0:
        return Interval(np.nan, np.nan, np.nan, 0)
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high), n)


def macro_interval(
    correct: np.ndarray | list,
    groups: np.ndarray | list,
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """The mean of per-group accuracies with a bootstrap interval over groups and their items."""
    correct, groups = as_outcomes(correct), np.asarray(groups)
    counts = category_counts(np.where(correct, 0, 1), groups, 2)
    value = float(np.mean(counts[:, 0] / counts.sum(axis=1)))
    reps = replicates(counts, np.array([1.0, 0.0]), True, n_resamples, seed)
    return Interval(value, *percentile(reps, level), n=correct.size)


def aligned(a: np.ndarray | list, b: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    """Two runs' outcomes on the same examples, in the same order."""
    a, b = as_outcomes(a), as_outcomes(b)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {a.size} and {b.size}")
    return a, b


def counts_by_group(kind: np.ndarray, groups: np.ndarray | list | None, categories: int):
    """[groups, categories] counts of each example's `kind`; one group when `groups` is None."""
    labels = np.zeros(kind.size, dtype=int) if groups is None else np.asarray(groups)
    return category_counts(kind, labels, categories)


def paired(
    a: np.ndarray | list,
    b: np.ndarray | list,
    groups: np.ndarray | list | None = None,
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """Accuracy of A minus accuracy of B, outcomes aligned example by example: Newcombe's
    interval. With `groups` the accuracies are macro averages over groups, and the interval is a
    bootstrap that resamples groups and their examples (`n_resamples`, `seed`)."""
    a, b = aligned(a, b)
    kind = np.where(a & ~b, 0, np.where(b & ~a, 1, 2))  # A only, B only, both or neither
    macro = groups is not None
    counts = counts_by_group(kind, groups, 3)
    weights = np.array([1.0, -1.0, 0.0])
    value = float(np.mean(counts @ weights / counts.sum(axis=1)))
    a_only, b_only = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    if macro:
        bounds = percentile(replicates(counts, weights, True, n_resamples, seed), level)
    else:
        both = int((a & b).sum())
        bounds = newcombe_paired(a_only, b_only, both, a.size - a_only - b_only - both, level)
    difference = Interval(value, *bounds, n=a.size)
    return Paired(difference, mcnemar_exact(a_only, b_only), a_only, b_only, mde(counts))


def paired_ratio(
    a: np.ndarray | list,
    b: np.ndarray | list,
    groups: np.ndarray | list | None = None,
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Accuracy of A over accuracy of B (macro averages over `groups` when given), outcomes
    aligned example by example, with a paired percentile bootstrap: a ratio has no closed form
    as simple as Newcombe's, and resampling the pairs keeps their correlation, which narrows it.
    NaN where B's accuracy (in the data or a replicate) is 0."""
    a, b = aligned(a, b)
    kind = np.where(a & b, 0, np.where(a, 1, np.where(b, 2, 3)))  # both, A only, B only, neither
    macro = groups is not None
    counts = counts_by_group(kind, groups, 4)
    weights = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # columns: A, B
    value = ratio(np.mean(counts @ weights / counts.sum(axis=1)[:, None], axis=0))
    reps = ratio(replicates(counts, weights, macro, n_resamples, seed))
    return Interval(float(value), *percentile(reps, level), n=a.size)


def ratio(accuracies: np.ndarray) -> np.ndarray:
    """[..., (A, B)] accuracies -> A / B, NaN where B is 0."""
    a, b = accuracies[..., 0], accuracies[..., 1]
    return np.divide(a, b, out=np.full(np.shape(a), np.nan), where=b > 0)


def newcombe_paired(
    a_only: int, b_only: int, both: int, neither: int, level: float = LEVEL
) -> tuple[float, float]:
    """Newcombe's (1998) interval for a difference of paired proportions (his method 10): the
    Wilson intervals of the two accuracies combined by square-and-add, with the phi correlation
    of the pairs; closed form, so the same on every call."""
    n = a_only + b_only + both + neither
    if n == 0:
        return np.nan, np.nan
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_bounds(both + a_only, n, level)
    l2, u2 = wilson_bounds(both + b_only, n, level)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / np.sqrt(margins) if margins else 0.0
    low = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    high = (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    delta = p1 - p2
    return float(max(-1.0, delta - np.sqrt(low))), float(min(1.0, delta + np.sqrt(high)))


def wilson_bounds(k: int, n: int, level: float) -> tuple[float, float]:
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def z_sum(alpha: float = ALPHA, power: float = POWER) -> float:
    """z_(1-alpha/2) + z_power: the standard errors a two-sided test's detectable effect spans."""
    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def mde(counts: np.ndarray, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest difference of (macro-averaged) accuracies a paired test of this size detects with
    `power`: (z_(1-alpha/2) + z_power) * SE, with SE^2 = mean over groups of (discordant share /
    group size) / groups, the variance of the difference near 0 (one group: discordance / n).
    `counts`: [groups, (A only, B only, same)]. NaN when no example is discordant."""
    counts = np.atleast_2d(counts)
    sizes = counts.sum(axis=1)
    discordant = (counts[:, 0] + counts[:, 1]) / sizes
    if not discordant.any():
        return np.nan
    return z_sum(alpha, power) * float(np.sqrt(np.sum(discordant / sizes)) / len(sizes))


def examples_for_power(
    differences: np.ndarray, alpha: float = ALPHA, power: float = POWER
) -> float:
    """Examples a paired test needs to detect the observed mean of per-example `differences`
    with `power` (normal approximation: ((z_(1-alpha/2) + z_power) * sd / mean)^2); inf when the
    mean is 0, NaN with fewer than two differences."""
    differences = np.asarray(differences, dtype=float)
    differences = differences[~np.isnan(differences)]
    if differences.size < 2:
        return np.nan
    mean, sd = abs(differences.mean()), differences.std(ddof=1)
    if mean == 0:
        return np.inf
    return float(np.ceil((z_sum(alpha, power) * sd / mean) ** 2))


def holm(p_values: np.ndarray | list) -> np.ndarray:
    """Holm's step-down adjusted p values (family-wise error at most alpha when a hypothesis is
    rejected where its adjusted p < alpha): the i-th smallest times (m - i + 1), made monotone."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p: the discordant pairs as a binomial test of p = 1/2."""
    a_only, b_only = int(a_only), int(b_only)
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def category_counts(kind: np.ndarray, groups: np.ndarray, categories: int) -> np.ndarray:
    """[groups, categories] counts of each item's category (groups in sorted order)."""
    _, index = np.unique(groups, return_inverse=True)
    counts = np.zeros((index.max() + 1 if index.size else 0, categories), dtype=np.int64)
    np.add.at(counts, (index, kind), 1)
    return counts


def replicates(
    counts: np.ndarray, weights: np.ndarray, resample_groups: bool, n_resamples: int, seed: int
) -> np.ndarray:
    """Bootstrap replicates of mean over groups of (counts · weights / group size): groups drawn
    with replacement (if `resample_groups`), then each drawn group's items, as multinomial counts
    with that group's observed proportions. `weights` [categories, k] gives k statistics per
    replicate, all from the same draws (a ratio's numerator and denominator)."""
    rng = np.random.default_rng(seed)
    sizes = counts.sum(axis=1)
    if sizes.size == 0:
        return np.full((n_resamples, *weights.shape[1:]), np.nan)
    probs = counts / sizes[:, None]
    out = []
    for start in range(0, n_resamples, BATCH):
        batch = min(BATCH, n_resamples - start)
        if resample_groups:
            drawn = rng.integers(0, len(sizes), size=(batch, len(sizes)))
        else:
            drawn = np.broadcast_to(np.arange(len(sizes)), (batch, len(sizes)))
        draws = rng.multinomial(sizes[drawn], probs[drawn])
        scale = sizes[drawn] if weights.ndim == 1 else sizes[drawn][..., None]
        out.append((draws @ weights / scale).mean(axis=1))
    return np.concatenate(out)


def percentile(reps: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return float(low), float(high)
