"""Intervals and paired comparisons for every run with per-example records (`Stats`)."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mka_exp.choices import did_you_mean
from mka_exp.methods import registry
from mka_exp.report import stats
from mka_exp.report.loading import (
    ReportError,
    column,
    column_order,
    load_records,
    note,
    outcome_sets,
    read_all_samples,
    repair_name,
    run_label,
)
from mka_exp.results import NON_RESULT_KEYS, config_hash, without_keys

# What a record's accuracy is compared against by default: the best of these at its layer count.
PRUNING_METHODS = registry.of_family("pruning")
MERGING_METHODS = registry.of_family("merging")  # what "does merging beat pruning?" compares
BEST_PRUNING = "best pruning"  # the default baseline's name
# A random guess among the choices. BoolQ's line is the majority answer's share of the evaluated
# examples instead, where per-example records give it: a model that always says "yes" gets that.
CHANCE = {"piqa": 0.5, "hellaswag": 0.25, "race": 0.25, "mmlu": 0.25, "boolq": 0.5}
MAJORITY_TASKS = ("boolq",)
MARK = "*"
CALIB_SEED = "calib.seed"
ID_COLUMNS = ["config_hash", "model", "quantizer", "method", "variant", "layers_before"]
ID_COLUMNS += ["layers_after", "removed"]


@dataclass
class Stats:
    """Intervals and paired differences for every record with per-example records.

    `accuracy`: one row per record × task metric (`column` = "<task> <metric>"; MMLU's is
    `acc_macro`): value, low, high (95 %), n. `differences`: one row per compressed record ×
    column: its baseline, the paired difference, its interval, McNemar's p, `significant`.
    `notes`: one line per problem (no baseline, different examples, missing records), with the
    model, quantizer and layer count it belongs to. Values are fractions."""

    accuracy: pd.DataFrame
    differences: pd.DataFrame
    notes: pd.DataFrame
    sensitivity: pd.DataFrame
    chance: dict[str, tuple[float, str]]
    baseline: str
    repair: pd.DataFrame = field(default_factory=pd.DataFrame)  # repaired vs unrepaired twin
    one_answer: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `one_answer_runs`


def accuracy_interval(outcomes: pd.DataFrame, metric: str, resamples: int) -> stats.Interval:
    if metric.endswith("_macro"):
        return stats.macro_interval(outcomes["y"], outcomes["subtask"], n_resamples=resamples)
    return stats.wilson(outcomes["y"])


def compute_stats(
    df: pd.DataFrame, root: Path, baseline: str | None = None, resamples: int = stats.N_RESAMPLES
) -> Stats:
    """Intervals, paired differences against the baseline and calibration sensitivity."""
    records = load_records(root)
    df = df.assign(removed=column(df, "layers_before") - column(df, "layers_after"))
    check_baseline(df, baseline)
    frames, notes = read_all_samples(df, records, root)
    rows, sets = [], {}
    for _, run in df[df["config_hash"].isin(frames)].iterrows():
        for (task, metric), outcomes in outcome_sets(frames[run["config_hash"]]).items():
            interval = accuracy_interval(outcomes, metric, resamples)
            column_name = f"{task} {metric}"
            sets[(run["config_hash"], column_name)] = outcomes
            ident = {k: run[k] for k in ID_COLUMNS}
            rows.append({**ident, "task": task, "metric": metric, "column": column_name,
                         "value": interval.value, "low": interval.low, "high": interval.high,
                         "n": interval.n, "groups": outcomes["subtask"].nunique()})  # fmt: skip
    accuracy = pd.DataFrame(rows, columns=[*ID_COLUMNS, "task", "metric", "column", "value",
                                           "low", "high", "n", "groups"])  # fmt: skip
    differences, more = paired_differences(accuracy, sets, baseline, resamples)
    notes = pd.DataFrame(notes + more, columns=["model", "quantizer", "removed", "text"])
    return Stats(
        accuracy,
        differences,
        notes.drop_duplicates(),
        calibration_sensitivity(df, records),
        chance_levels(sets),
        baseline or BEST_PRUNING,
        repair_effects(accuracy, sets, records, resamples),
        one_answer_runs(df, frames),
    )


# A run that gives one answer to this share of a task's examples scores about that answer's share
# of the targets there (boolq: the yes-rate), whatever the compression kept or lost.
ONE_ANSWER_SHARE = 0.9
ONE_ANSWER_COLUMNS = [*ID_COLUMNS, "task", "answer", "share", "target_share", "n"]


def one_answer_runs(df: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Run × task where the chosen answer (`pred`) is one and the same for at least
    ONE_ANSWER_SHARE of the examples, with that share and the answer's share of the targets."""
    rows = []
    for _, run in df[df["config_hash"].isin(frames)].iterrows():
        frame = frames[run["config_hash"]]
        frame = frame[(frame["filter"] == "none") & frame["pred"].notna()]
        for task, got in frame.groupby("task", sort=False):
            shares = got["pred"].astype(int).value_counts(normalize=True)
            if shares.iloc[0] >= ONE_ANSWER_SHARE:
                answer = int(shares.index[0])
                target_share = (pd.to_numeric(got["target"], errors="coerce") == answer).mean()
                rows.append({**{k: run[k] for k in ID_COLUMNS}, "task": task, "answer": answer,
                             "share": float(shares.iloc[0]), "target_share": float(target_share),
                             "n": len(got)})  # fmt: skip
    return pd.DataFrame(rows, columns=ONE_ANSWER_COLUMNS)


def twin_key(record: dict) -> str:
    """The record's config without its repair and without what the config hash leaves out
    (paths, caches, loggers): equal for repair twins, wherever each ran."""
    config = without_keys(record.get("config") or {}, NON_RESULT_KEYS)
    config = json.loads(json.dumps(config, default=str))
    for part in (config, config.get("calib") or {}, config.get("eval") or {}):
        part.pop("data_root", None)
    config.pop("repair", None)
    return json.dumps(config, sort_keys=True)


def repair_effects(
    accuracy: pd.DataFrame, sets: dict, records: dict[str, dict], resamples: int
) -> pd.DataFrame:
    """Each repaired run against the same run without repair, paired per column."""
    names = {h: repair_name((r.get("config") or {}).get("repair", {}).get("_target_"))
             for h, r in records.items()}  # fmt: skip
    plain = {twin_key(r): h for h, r in records.items() if names[h] == "none"}
    rows = []
    for _, row in accuracy.iterrows():
        record = records.get(row["config_hash"], {})
        twin = plain.get(twin_key(record)) if names.get(row["config_hash"]) != "none" else None
        if twin is None or (twin, row["column"]) not in sets:
            continue
        a, b = sets[(row["config_hash"], row["column"])], sets[(twin, row["column"])]
        aligned, problem = align(a, b)
        if problem:
            continue
        ident = {k: row[k] for k in ID_COLUMNS} | {"column": row["column"]}
        rows.append(ident | {"repair": names[row["config_hash"]]}
                    | paired_cells(aligned, row["metric"], resamples))  # fmt: skip
    return pd.DataFrame(rows)


def check_baseline(df: pd.DataFrame, baseline: str | None) -> None:
    """`--baseline METHOD` must name a method some record used."""
    if baseline is None or (df["method"] == baseline).any():
        return
    methods = sorted(set(df["method"]))
    hint = did_you_mean(baseline, methods)
    raise ReportError(
        f"--baseline {baseline}: no records of that method (methods: {', '.join(methods)}{hint})"
    )


def pick_baseline(accuracy: pd.DataFrame, row: pd.Series, method: str | None) -> pd.Series | None:
    """The baseline run for `row`'s column: the most accurate record of `method` (default: of
    any pruning method) with the same model, quantizer and layer count; None if there is none."""
    pool = accuracy[
        (accuracy["model"] == row["model"])
        & (accuracy["quantizer"] == row["quantizer"])
        & (accuracy["layers_after"] == row["layers_after"])
        & (accuracy["column"] == row["column"])
    ]
    pool = pool[pool["method"] == method] if method else pool[pool["method"].isin(PRUNING_METHODS)]
    return None if pool.empty else pool.loc[pool["value"].idxmax()]  # ties: the first in order


def paired_differences(
    accuracy: pd.DataFrame, sets: dict, baseline: str | None, resamples: int
) -> tuple[pd.DataFrame, list[dict]]:
    rows, notes = [], []
    wanted = baseline or f"pruning ({', '.join(PRUNING_METHODS)})"
    for _, row in accuracy[accuracy["removed"] > 0].iterrows():
        base = pick_baseline(accuracy, row, baseline)
        if base is None:
            text = f"no baseline at {int(row['removed'])} layers removed: no {wanted} record with "
            notes.append(note(row, text + "per-example records there"))
            continue
        out = {k: row[k] for k in ID_COLUMNS} | {"column": row["column"]}
        out |= {"baseline": run_label(base), "baseline_hash": base["config_hash"]}
        if base["config_hash"] == row["config_hash"]:
            rows.append(out | {"is_baseline": True})
            continue
        a, b = sets[(row["config_hash"], row["column"])], sets[(base["config_hash"], row["column"])]
        aligned, problem = align(a, b)
        if problem:
            text = f"paired test impossible: {run_label(row)} and {run_label(base)} were "
            notes.append(
                note(row, text + f"evaluated on different {row['task']} examples ({problem})")
            )
            continue
        rows.append(out | {"is_baseline": False} | paired_cells(aligned, row["metric"], resamples))
    return pd.DataFrame(rows), notes


def paired_cells(aligned: pd.DataFrame, metric: str, resamples: int) -> dict:
    """The paired difference of aligned outcomes (MMLU's macro: resampled by subject)."""
    groups = aligned["subtask"] if metric.endswith("_macro") else None
    result = stats.paired(aligned["y_a"], aligned["y_b"], groups, n_resamples=resamples)
    d = result.difference
    return {"difference": d.value, "low": d.low, "high": d.high, "p_value": result.p_value,
            "a_only": result.a_only, "b_only": result.b_only,
            "significant": result.significant}  # fmt: skip


def align(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """A's and B's outcomes side by side, example by example; or why they cannot be paired."""
    key = ["subtask", "doc_id"]
    both = a.merge(b, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
    only = int((both["_merge"] != "both").sum())
    if only:
        return both, f"{only} of {len(both)} examples evaluated by only one"
    if (both["doc_hash_a"] != both["doc_hash_b"]).any():
        return both, "same ids, different documents"
    if (both["prompt_hash_a"] != both["prompt_hash_b"]).any():
        return both, "same documents, different prompts (few-shot settings?)"
    return both, ""


def chance_levels(sets: dict) -> dict[str, tuple[float, str]]:
    """Task -> (chance accuracy, how it was chosen), for the plots' reference line."""
    levels = {task: (level, "random guess") for task, level in CHANCE.items()}
    for (_, column_name), outcomes in sets.items():
        task = column_name.split(" ", 1)[0]
        if task in MAJORITY_TASKS and levels[task][1] == "random guess":
            share = outcomes["target"].astype(str).value_counts(normalize=True).iloc[0]
            levels[task] = (float(share), "majority answer")
    return levels


def layer_choice(method_stats: dict) -> tuple | None:
    """What a method chose: the merges as (kept, merged...) (MKA: one dropped layer each; LaCo:
    `merged`, a list), else the removed layers."""
    if method_stats.get("merges"):
        return tuple(
            (m.get("keep"), *m.get("merged", [m.get("drop")])) for m in method_stats["merges"]
        )
    removed = method_stats.get("removed_layers")
    return tuple(sorted(removed)) if removed is not None else None


def sensitivity_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A record's task accuracies under the accuracy tables' column names (MMLU: macro)."""
    out = {}
    for key, value in metrics.items():
        task, _, metric = key.partition("/")
        if metric not in ("acc", "acc_norm", "acc_macro", "acc_norm_macro"):
            continue
        if f"{task}/{metric}_macro" in metrics:
            continue  # a group: its macro average is the column
        out[f"{task} {metric}"] = value
    return out


def calibration_sensitivity(df: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    """For runs that differ only in `calib.seed`: how often the chosen layers change and how
    far each accuracy moves (mean, standard deviation and range over the seeds, fractions)."""
    groups: dict[str, list[dict]] = {}
    for record in records.values():
        config = record.get("config") or {}
        if (config.get("calib") or {}).get("seed") is not None:
            key = config_hash(without_keys(config, (CALIB_SEED,)))
            groups.setdefault(key, []).append(record)
    labels = df.set_index("config_hash")["variant"].to_dict() if "variant" in df else {}
    rows = []
    for group in groups.values():
        if len({r["config"]["calib"]["seed"] for r in group}) < 2:
            continue
        rows.append(seed_row(group, labels))
    return pd.DataFrame(rows)


def seed_row(group: list[dict], labels: dict[str, str]) -> dict:
    choices = [layer_choice(r.get("method_stats") or {}) for r in group]
    most = Counter(choices).most_common(1)[0][1]
    pairs = list(itertools.combinations(choices, 2))
    first = group[0]
    variant = re.sub(r"calib\.seed=[^,]*(, )?", "", labels.get(first["config_hash"], "")).strip(
        ", "
    )
    row = {
        "model": first.get("model"),
        "method": first.get("method"),
        "variant": variant,
        "removed": first.get("layers_before", 0) - first.get("layers_after", 0),
        "seeds": len(group),
        "layer_choices": len(set(choices)),
        "seeds_off_most_common": len(group) - most,
        "seed_pairs_differing": float(np.mean([x != y for x, y in pairs])),
    }
    values = [sensitivity_metrics(r.get("metrics") or {}) for r in group]
    for name in sorted(set.intersection(*(set(v) for v in values)), key=column_order):
        series = np.array([v[name] for v in values])
        row |= {f"{name} mean": series.mean(), f"{name} sd": series.std(ddof=1),
                f"{name} range": series.max() - series.min()}  # fmt: skip
    return row
