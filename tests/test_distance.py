"""Distance to the dense model on hand-made per-example frames: values computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mka_exp.report import distance, stats

LOG = np.log


def frame(lls: list[list[float]], gold: list[int], lengths=None, task="piqa") -> pd.DataFrame:
    n = len(lls)
    return pd.DataFrame({
        "task": task, "subtask": task, "doc_id": np.arange(n), "doc_hash": [f"h{i}" for i in range(n)],
        "target": gold, "filter": "none", "choice_ll": lls,
        "choice_len": lengths if lengths is not None else [None] * n,
    })  # fmt: skip


def test_kl_flips_and_gold_change_equal_the_hand_computed_values():
    # example 0: dense right (choice 0), compressed wrong -> correct->wrong
    # example 1: dense wrong (choice 1, gold 0), compressed right -> wrong->correct
    # example 2: both choose 0 (gold 0), no flip
    dense = frame([[0.0, LOG(0.5)], [LOG(0.2), LOG(0.8)], [LOG(0.5), LOG(0.5) - 1]], [0, 0, 0])
    comp = frame([[LOG(0.1), LOG(0.9)], [LOG(0.7), LOG(0.3)], [LOG(0.6), LOG(0.4)]], [0, 0, 0])
    per = distance.per_example(distance.choices(dense, "piqa"), distance.choices(comp, "piqa"))
    assert per["flips"].tolist() == [1.0, 1.0, 0.0]
    assert per["correct_to_wrong"].tolist() == [1.0, 0.0, 0.0]
    assert per["wrong_to_correct"].tolist() == [0.0, 1.0, 0.0]
    p0 = np.array([1, 0.5]) / 1.5  # softmax of [0, log 0.5]
    kl0 = np.sum(p0 * np.log(p0 / np.array([0.1, 0.9])))
    kl1 = 0.2 * np.log(0.2 / 0.7) + 0.8 * np.log(0.8 / 0.3)
    e = np.exp(-1)
    p2 = np.array([1, e]) / (1 + e)
    kl2 = np.sum(p2 * np.log(p2 / np.array([0.6, 0.4])))
    assert per["kl"].to_numpy() == pytest.approx([kl0, kl1, kl2], rel=1e-12)
    gold = [np.log(0.1) - np.log(p0[0]), np.log(0.7) - np.log(0.2), np.log(0.6) - np.log(p2[0])]
    assert per["gold_delta"].to_numpy() == pytest.approx(gold, rel=1e-12)
    summary = distance.summary(per, resamples=2000)
    assert summary["flips"].value == pytest.approx(2 / 3)
    assert summary["kl"].value == pytest.approx((kl0 + kl1 + kl2) / 3)
    assert summary["kl"].low <= summary["kl"].value <= summary["kl"].high
    assert np.isnan(per["flips_norm"]).all()  # no lengths: no acc_norm prediction


def test_identical_runs_have_zero_distance_and_acc_norm_uses_the_lengths():
    lls = [[-1.0, -3.0], [-2.0, -4.0]]
    dense = frame(lls, [0, 1], lengths=[[1, 1], [1, 10]])  # per char: [-2, -0.4] -> choice 1
    same = distance.per_example(distance.choices(dense, "piqa"), distance.choices(dense, "piqa"))
    assert (same[["flips", "kl", "gold_delta"]].to_numpy() == 0).all()
    shifted = frame([[-1.0, -3.0], [-2.0, -30.0]], [0, 1], lengths=[[1, 1], [1, 10]])
    per = distance.per_example(distance.choices(dense, "piqa"), distance.choices(shifted, "piqa"))
    assert per["flips"].tolist() == [0.0, 0.0]  # raw argmax stays 0 in both examples
    assert per["flips_norm"].tolist() == [0.0, 1.0]  # -3.0 per char beats -2.0: acc_norm flips


def test_runs_on_other_examples_do_not_pair_and_old_records_have_no_choices():
    dense = frame([[0.0, -1.0]] * 3, [0, 0, 0])
    other = dense.assign(doc_hash=["x", "y", "z"])
    assert (
        distance.per_example(distance.choices(dense, "piqa"), distance.choices(other, "piqa"))
        is None
    )
    assert distance.per_example(distance.choices(dense, "piqa"),
                                distance.choices(dense.iloc[:2], "piqa")) is None  # fmt: skip
    assert not distance.has_choices(dense.drop(columns=["choice_ll"]))
    assert not distance.has_choices(dense.assign(choice_ll=None))
    assert distance.has_choices(dense)


def test_compare_and_power_from_per_example_differences():
    rng = np.random.default_rng(0)
    n = 400
    gold = np.zeros(n, dtype=int)
    base = rng.normal(0, 1, (n, 4))
    base[:, 0] += 1.0  # the dense model mostly right
    dense = frame(base.tolist(), gold)
    near = frame((base + rng.normal(0, 0.2, (n, 4))).tolist(), gold)  # a mild compression
    far = frame((base + rng.normal(0, 0.6, (n, 4))).tolist(), gold)  # a harsher one
    d = distance.choices(dense, "piqa")
    per_near = distance.per_example(d, distance.choices(near, "piqa"))
    per_far = distance.per_example(d, distance.choices(far, "piqa"))
    diff = distance.compare(per_far, per_near, resamples=2000)
    expected = (per_far["kl"] - per_near["kl"]).mean()
    assert diff["kl"].value == pytest.approx(expected) and diff["kl"].low > 0  # far is farther
    got = distance.power(per_far, per_near)
    acc = per_far["correct"] - per_near["correct"]
    kl = per_far["kl"] - per_near["kl"]
    assert got["n_acc"] == stats.examples_for_power(acc.to_numpy())
    assert got["n_kl"] == stats.examples_for_power(kl.to_numpy())
    assert got["ratio"] == pytest.approx(got["n_acc"] / got["n_kl"])
    assert got["n_kl"] < got["n_acc"]  # the continuous paired metric separates them sooner
    with pytest.raises(ValueError, match="same examples"):
        distance.power(per_far, per_near.iloc[:10])
