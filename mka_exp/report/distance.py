"""Distance to the dense model, from each example's per-choice log-likelihoods.

Equal accuracies can hide many changed answers (Dutta et al. 2024, arXiv 2407.09141). Where the
per-example records keep `choice_ll` (lm-eval's log-likelihood of each choice, what `acc` compares)
and `choice_len` (the length `acc_norm` divides by), a compressed run is compared with its model's
dense run on the same examples:

    flips       the example's `acc` prediction (argmax of choice_ll) changed; split into
                correct -> wrong and wrong -> correct (`flips_norm`: the `acc_norm` prediction)
    kl          KL(dense softmax over the choices || compressed softmax over the choices), nats
    gold_delta  change of the gold answer's log-probability under the choice softmax

each averaged over the examples with a bootstrap interval (the examples resampled, each one's
dense and compressed values together). Per-example values of two runs on the same examples give
their paired difference (`compare`) and the examples each metric needs to separate them
(`power`): KL is continuous and paired, so it often needs far fewer than accuracy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from scipy.stats import bootstrap

from mka_exp.report import stats
from mka_exp.report.loading import same_examples

KEY = ["subtask", "doc_id"]
METRICS = ("flips", "correct_to_wrong", "wrong_to_correct", "flips_norm", "kl", "gold_delta")


def has_choices(frame: pd.DataFrame) -> bool:
    """Whether these per-example rows keep per-choice log-likelihoods (newer records do)."""
    return "choice_ll" in frame and frame["choice_ll"].map(is_list).any()


def is_list(value: object) -> bool:
    return isinstance(value, list | tuple | np.ndarray) and len(value) > 0


def choices(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """The task's multiple-choice rows that have log-likelihoods and an index gold answer."""
    rows = frame[(frame["task"] == task) & (frame["filter"] == "none")]
    rows = rows[rows["choice_ll"].map(is_list)]
    gold = pd.to_numeric(rows["target"], errors="coerce")
    return rows[gold.notna()].assign(gold=gold[gold.notna()].astype(int))


def per_example(dense: pd.DataFrame, compressed: pd.DataFrame) -> pd.DataFrame | None:
    """Per example (same subtask/doc_id/document in both): the metrics above; None when the two
    runs do not hold the same examples."""
    cols = [*KEY, "doc_hash", "gold", "choice_ll", "choice_len"]
    both = same_examples(dense.reindex(columns=cols), compressed.reindex(columns=cols), KEY)
    if both is None or (both["doc_hash_a"] != both["doc_hash_b"]).any():
        return None
    rows = [example(*row) for row in zip(both["choice_ll_a"], both["choice_ll_b"],
                                         both["choice_len_a"], both["gold_a"], strict=True)]  # fmt: skip
    return pd.concat([both[KEY], pd.DataFrame(rows, columns=[*METRICS, "correct_dense",
                                                              "correct"])], axis=1)  # fmt: skip


def example(ll_dense: list, ll_comp: list, lengths: object, gold: int) -> tuple:
    """One example's metrics (and whether each run's `acc` prediction is right)."""
    log_d, log_c = log_softmax(np.asarray(ll_dense, float)), log_softmax(np.asarray(ll_comp, float))
    pred_d, pred_c = int(np.argmax(log_d)), int(np.argmax(log_c))
    right_d, right_c = pred_d == gold, pred_c == gold
    kl = float(np.sum(np.exp(log_d) * (log_d - log_c)))
    flip_norm = np.nan
    if is_list(lengths):  # acc_norm: the log-likelihood per character of the choice
        scale = np.asarray(lengths, float)
        norm_d = np.argmax(np.asarray(ll_dense, float) / scale)
        flip_norm = float(norm_d != np.argmax(np.asarray(ll_comp, float) / scale))
    return (float(pred_d != pred_c), float(right_d and not right_c), float(right_c and not right_d),
            flip_norm, kl, float(log_c[gold] - log_d[gold]), float(right_d), float(right_c))  # fmt: skip


def mean_interval(values: np.ndarray, boot_resamples: int, seed: int) -> stats.Interval:
    """Mean with a percentile bootstrap interval over examples (scipy's bootstrap)."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return stats.Interval(float(np.mean(values)) if values.size else np.nan, np.nan, np.nan,
                              values.size)  # fmt: skip
    if np.all(values == values[0]):  # no spread: nothing to resample
        return stats.Interval(float(values[0]), float(values[0]), float(values[0]), values.size)
    ci = bootstrap((values,), np.mean, n_resamples=boot_resamples, method="percentile",
                   random_state=seed, vectorized=True).confidence_interval  # fmt: skip
    return stats.Interval(float(values.mean()), float(ci.low), float(ci.high), values.size)


def summary(per: pd.DataFrame, resamples: int = stats.N_RESAMPLES, seed: int = stats.SEED) -> dict:
    """Each metric's mean over the examples with its bootstrap interval."""
    return {m: mean_interval(per[m].to_numpy(), resamples, seed) for m in METRICS}


def compare(
    per_a: pd.DataFrame, per_b: pd.DataFrame, resamples: int = stats.N_RESAMPLES,
    seed: int = stats.SEED,
) -> dict:  # fmt: skip
    """A minus B per metric, paired example by example (both against the same dense run)."""
    both = same_examples(per_a, per_b, KEY)
    if both is None:
        raise ValueError("the two runs were not evaluated on the same examples")
    return {m: mean_interval(both[f"{m}_a"] - both[f"{m}_b"], resamples, seed)
            for m in (*METRICS, "correct")}  # fmt: skip


def power(per_a: pd.DataFrame, per_b: pd.DataFrame) -> dict:
    """Examples a paired test needs for 80 % power at α = 0.05 to detect the observed difference,
    from the per-example differences: of accuracy (`correct`) and of KL, and their ratio."""
    both = same_examples(per_a, per_b, KEY)
    if both is None:
        raise ValueError("the two runs were not evaluated on the same examples")
    acc = both["correct_a"] - both["correct_b"]
    kl = both["kl_a"] - both["kl_b"]
    n_acc, n_kl = stats.examples_for_power(acc), stats.examples_for_power(kl)
    return {"n": len(both), "acc_difference": float(acc.mean()), "kl_difference": float(kl.mean()),
            "n_acc": n_acc, "n_kl": n_kl, "ratio": n_acc / n_kl if n_kl else np.nan}  # fmt: skip


def dense_distances(
    accuracy: pd.DataFrame, frames: dict[str, pd.DataFrame], resamples: int, seed: int
) -> tuple[pd.DataFrame, dict]:
    """Every compressed run with choice log-likelihoods against its model's dense run, per task:
    one row of intervals each; and the per-example frames by (config hash, task)."""
    have = {h for h, frame in frames.items() if has_choices(frame)}
    runs = accuracy[accuracy["config_hash"].isin(have)].drop_duplicates(["config_hash", "task"])
    dense = runs[runs["removed"] == 0]
    rows, pers = [], {}
    for _, run in runs[runs["removed"] > 0].iterrows():
        mine = choices(frames[run["config_hash"]], run["task"])
        candidates = dense[(dense["model"] == run["model"]) & (dense["task"] == run["task"])]
        for _, base in candidates.iterrows():
            per = per_example(choices(frames[base["config_hash"]], run["task"]), mine)
            if per is not None:
                pers[(run["config_hash"], run["task"])] = per
                ident = {k: run[k] for k in ("config_hash", "model", "quantizer", "method",
                                             "variant", "removed", "task")}  # fmt: skip
                rows.append(ident | {"dense_hash": base["config_hash"]}
                            | summary(per, resamples, seed))  # fmt: skip
                break
    return pd.DataFrame(rows), pers


def declared_distances(
    primary: pd.DataFrame, pers: dict, resamples: int, seed: int
) -> pd.DataFrame:
    """The declared run-vs-run comparisons (not the composite baselines) in KL and flips, with
    the examples each of accuracy and KL needs for 80 % power."""
    if primary.empty or not pers:
        return pd.DataFrame()
    rows = []
    for _, row in primary[primary["kind"] == "pair"].iterrows():
        task, b_hash = row["column"].split(" ", 1)[0], str(row["baseline_hash"])
        a, b = pers.get((row["config_hash"], task)), pers.get((b_hash, task))
        if a is None or b is None:  # a composite baseline, or a run without log-likelihoods
            continue
        diff = compare(a, b, resamples, seed)
        rows.append({k: row[k] for k in ("model", "quantizer", "removed", "comparison")}
                    | {"task": task, "kl": diff["kl"], "flips": diff["flips"]} | power(a, b))  # fmt: skip
    return pd.DataFrame(rows)
