"""Retained accuracy: each compressed run's accuracy as a share of its dense model's, at 25 % of
the decoder layers removed (or the nearest cuts either side), and the published figures for
other models beside it.

The literature states compression results as "x % of dense at 25 %" (ReplaceMe; the MKA paper's
Llama-3-8B curve), a scale our absolute accuracies and differences do not show. Per model this
takes the cut of a quarter of its layers, or while no run has it the nearest cut with records on
either side (7 of 28 on Qwen-1.5B once such runs exist; 4 and 8 of 28 until then), pairs every
unquantized run there with the model's dense run on the same examples, and gives compressed / dense with a paired bootstrap interval
(`stats.paired_ratio`). The published figures come from `literature.csv` beside this module; the
MKA paper's rows name a point of `paper_results.csv`, whose accuracy and dense accuracy give the
share, so no published number is typed twice. They are other models and other protocols: the
document prints them for scale, never as a reproduction.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from mka_exp.report import stats
from mka_exp.report.loading import align, run_label
from mka_exp.report.sensitivity import ID_COLUMNS
from mka_exp.report.tables import PAPER_MODELS, RATIO_TOL, load_paper

TARGET = 0.25  # the fraction of layers the literature reports at
METRICS = ("acc", "acc_macro")  # one per task: what the declarations compare (MMLU: macro)
LITERATURE = "literature.csv"
COLUMNS = [*ID_COLUMNS, "column", "task", "metric", "dense_hash", "accuracy", "dense_accuracy",
           "retained", "low", "high", "n"]  # fmt: skip


def nearest_cuts(removed: pd.Series, layers: int) -> list[int]:
    """The layer count removed that is 25 % of `layers` if it has records; else the nearest on
    each side that has (4 and 8 of 28 until 7 of 28 runs exist), so a reader sees where 25 % falls
    between them. Compared as integers, so "exactly 25 %" is exact."""
    cuts = sorted({int(r) for r in removed if r > 0})
    exact = [cut for cut in cuts if cut * 4 == layers]
    if exact:
        return exact
    below = [cut for cut in cuts if cut * 4 < layers][-1:]
    above = [cut for cut in cuts if cut * 4 > layers][:1]
    return below + above


def retained_rows(
    accuracy: pd.DataFrame, sets: dict, resamples: int = stats.N_RESAMPLES, seed: int = stats.SEED
) -> tuple[pd.DataFrame, list[str]]:
    """Per model, every unquantized run at its cut(s) nearest 25 % × column: accuracy over the dense
    run's on the same examples, with its paired interval (fractions); and a line per run that has
    no dense run to pair with."""
    acc = accuracy[(accuracy["quantizer"] == "none") & accuracy["metric"].isin(METRICS)]
    rows, notes = [], []
    for _, runs in acc.groupby("model", sort=False):
        dense = runs[(runs["method"] == "none") & (runs["removed"] == 0)]
        cuts = nearest_cuts(runs["removed"], int(runs["layers_before"].iloc[0]))
        for _, run in runs[runs["removed"].isin(cuts)].iterrows():
            row = paired_with_dense(run, dense, sets, resamples, seed)
            if row is None:
                notes.append(f"{run_label(run, model=True)}: no dense run on the same "
                             f"{run['task']} examples, so no retained share")  # fmt: skip
            else:
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS), notes


def paired_with_dense(
    run: pd.Series, dense: pd.DataFrame, sets: dict, resamples: int, seed: int
) -> dict | None:
    """The run's retained share against the first dense run evaluated on the same examples."""
    outcomes = sets[(run["config_hash"], run["column"])]
    for _, base in dense[dense["column"] == run["column"]].iterrows():
        aligned, problem = align(outcomes, sets[(base["config_hash"], run["column"])])
        if problem:
            continue
        groups = aligned["subtask"] if run["metric"].endswith("_macro") else None
        share = stats.paired_ratio(aligned["y_a"], aligned["y_b"], groups,
                                   n_resamples=resamples, seed=seed)  # fmt: skip
        return {k: run[k] for k in ID_COLUMNS} | {
            "column": run["column"], "task": run["task"], "metric": run["metric"],
            "dense_hash": base["config_hash"], "accuracy": run["value"],
            "dense_accuracy": base["value"], "retained": share.value, "low": share.low,
            "high": share.high, "n": share.n}  # fmt: skip
    return None


# ---------------------------------------------------------------- the published figures


def load_literature(path: Path | None = None) -> pd.DataFrame:
    """`literature.csv` (or `path`) with `accuracy`, `dense_accuracy` and `retained_pct` filled
    for the rows that name a point of the MKA paper's `paper_results.csv` (the dense row from the
    same file); a row whose point the file lacks is an error naming it."""
    with (path or resources.files("mka_exp.report").joinpath(LITERATURE)).open() as fh:
        lit = pd.read_csv(fh)
    lit["accuracy"], lit["dense_accuracy"] = np.nan, np.nan
    paper = load_paper()
    for index, row in lit[lit["paper_table"].notna()].iterrows():
        acc = paper_accuracy(
            paper, row, row["paper_method"], row["compression"], row["paper_table"]
        )
        dense = paper_accuracy(paper, row, "none", 0.0, None)
        lit.loc[index, ["accuracy", "dense_accuracy"]] = acc, dense
        lit.loc[index, "retained_pct"] = 100 * acc / dense
    return lit


def paper_accuracy(
    paper: pd.DataFrame, row: pd.Series, method: str, ratio: float, table: str | None
) -> float:
    model = {v: k for k, v in PAPER_MODELS.items()}.get(row["paper_model"], row["paper_model"])
    hits = paper[(paper["model"] == model) & (paper["method"] == method)
                 & (paper["quantizer"] == "none") & (paper["task"] == row["task"])
                 & ((paper["compression_ratio"] - ratio).abs() < RATIO_TOL)]  # fmt: skip
    if table is not None:
        hits = hits[hits["table"] == table]
    if hits.empty:
        raise ValueError(f"{LITERATURE}: paper_results.csv has no {table or 'any table'} row for "
                         f"{row['paper_model']} {method} at {ratio:g} on {row['task']}")  # fmt: skip
    return float(hits["acc"].iloc[0])
