"""A "best of a group" baseline chosen on examples disjoint from those it is tested on.

Picking the most accurate of ten pruning runs on the very examples it is then compared on favours
it by the luck of those examples. Cross-fitting removes that: the examples are split into two
halves (within each subject, by `doc_id`: the 1st, 3rd, 5th ... example go to half A, the others to
half B: deterministic, no seed); the run most accurate on half B is the baseline's outcome on half
A, the run most accurate on half A its outcome on half B. The result is one composite 0/1 outcome
per example, paired with a compared run like any run (`Composite.outcomes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

KEY = ["subtask", "doc_id"]


@dataclass(frozen=True)
class Composite:
    """The cross-fitted baseline of one column: its outcomes (the reference run's examples, `y`
    from the run chosen on the other half), the hashes and labels of the run tested on half A
    (chosen on B) and on half B (chosen on A)."""

    outcomes: pd.DataFrame
    hashes: tuple[str, str]
    labels: tuple[str, str]

    def describe(self) -> str:
        (on_a, on_b), (hash_a, hash_b) = self.labels, self.hashes
        if hash_a == hash_b:
            return f"{on_a} (chosen on each half)"
        return f"{on_a} on half A (chosen on B), {on_b} on half B (chosen on A)"


def half_a(outcomes: pd.DataFrame) -> np.ndarray:
    """True for the examples of half A: odd ranks of `doc_id` within each subject."""
    rank = outcomes.groupby("subtask")["doc_id"].rank(method="first")
    return (rank % 2 == 1).to_numpy()


def score(outcomes: pd.DataFrame, mask: np.ndarray, macro: bool) -> float:
    kept = outcomes[mask]
    return float(kept.groupby("subtask")["y"].mean().mean() if macro else kept["y"].mean())


def cross_fit(pool: list[tuple[str, str, pd.DataFrame]], macro: bool) -> Composite:
    """`pool`: (config hash, label, outcomes) in display order, all on the same examples (the
    caller checks). Ties go to the first in display order."""
    frames = [outcomes.sort_values(KEY).reset_index(drop=True) for _, _, outcomes in pool]
    in_a = half_a(frames[0])
    on_a = int(np.argmax([score(f, ~in_a, macro) for f in frames]))  # chosen on B, tested on A
    on_b = int(np.argmax([score(f, in_a, macro) for f in frames]))
    y = np.where(in_a, frames[on_a]["y"].to_numpy(), frames[on_b]["y"].to_numpy())
    outcomes = frames[0].assign(y=y)
    return Composite(outcomes, (pool[on_a][0], pool[on_b][0]), (pool[on_a][1], pool[on_b][1]))
