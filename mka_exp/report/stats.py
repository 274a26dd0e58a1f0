"""Intervals and paired tests for accuracies measured on per-example records.

At 200 examples one accuracy has a standard error of about 0.035, so a table of point estimates
cannot say whether two methods differ. This module gives, from the 0/1 outcomes of
`mka_exp.samples`:

- `wilson`: a 95 % Wilson score interval for one accuracy (scipy's `binomtest(...).proportion_ci`).
- `macro_interval`: for a macro average over subjects (MMLU as the paper reports it), a percentile
  bootstrap that resamples subjects and, within each drawn subject, its questions.
- `paired`: method A against baseline B on the same examples: the difference of accuracies (or
  of macro averages) with a paired percentile bootstrap interval (an example's two outcomes are
  resampled together; by subject and question for a macro average) and McNemar's exact p
  (scipy's two-sided binomial test on the discordant pairs, so it always pools the examples).

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
from scipy.stats import binomtest

LEVEL = 0.95
N_RESAMPLES = 10_000
SEED = 0
BATCH = 500  # replicates drawn at once (bounds memory for many subjects)


@dataclass(frozen=True)
class Interval:
    """An estimate with its `level` interval; `n` examples behind it."""

    value: float
    low: float
    high: float
    n: int

    def excludes(self, point: float = 0.0) -> bool:
        return not self.low <= point <= self.high


@dataclass(frozen=True)
class Paired:
    """A − B on the same examples: the difference with its interval, McNemar's exact p and the
    discordant counts (`a_only`: A right and B wrong; `b_only`: the reverse)."""

    difference: Interval
    p_value: float
    a_only: int
    b_only: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (what the report's tables mark)."""
        return self.difference.excludes(0.0)


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


def paired(
    a: np.ndarray | list,
    b: np.ndarray | list,
    groups: np.ndarray | list | None = None,
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """Accuracy of A minus accuracy of B, outcomes aligned example by example. With `groups`
    the accuracies are macro averages over groups, and the bootstrap resamples groups too."""
    a, b = as_outcomes(a), as_outcomes(b)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {a.size} and {b.size}")
    kind = np.where(a & ~b, 0, np.where(b & ~a, 1, 2))  # A only, B only, both or neither
    macro = groups is not None
    labels = np.asarray(groups) if macro else np.zeros(a.size, dtype=int)
    counts = category_counts(kind, labels, 3)
    weights = np.array([1.0, -1.0, 0.0])
    value = float(np.mean(counts @ weights / counts.sum(axis=1)))
    reps = replicates(counts, weights, macro, n_resamples, seed)
    a_only, b_only = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    difference = Interval(value, *percentile(reps, level), n=a.size)
    return Paired(difference, mcnemar_exact(a_only, b_only), a_only, b_only)


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
    with that group's observed proportions."""
    rng = np.random.default_rng(seed)
    sizes = counts.sum(axis=1)
    if sizes.size == 0:
        return np.full(n_resamples, np.nan)
    probs = counts / sizes[:, None]
    out = []
    for start in range(0, n_resamples, BATCH):
        batch = min(BATCH, n_resamples - start)
        if resample_groups:
            drawn = rng.integers(0, len(sizes), size=(batch, len(sizes)))
        else:
            drawn = np.broadcast_to(np.arange(len(sizes)), (batch, len(sizes)))
        draws = rng.multinomial(sizes[drawn], probs[drawn])
        out.append((draws @ weights / sizes[drawn]).mean(axis=1))
    return np.concatenate(out)


def percentile(reps: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return float(low), float(high)
