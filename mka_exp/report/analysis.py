"""Intervals and paired comparisons for every run with per-example records (`Stats`).

Every compressed run is compared, per task column, with a baseline on the same examples: by
default the best pruning run at its layer count, cross-fitted (`crossfit`); with `--baseline
METHOD`, the best run of that method, cross-fitted the same way when it has several. Repaired runs
are also compared with their unrepaired twins. Which of these comparisons are confirmatory, and
so marked after Holm's correction, is up to the declaration (`declared`); the rest is exploratory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from mka_exp.choices import did_you_mean
from mka_exp.methods import registry
from mka_exp.report import crossfit, declared, distance, repair_fits, retained, stats
from mka_exp.report.loading import (
    GROUP,
    ReportError,
    align,
    column,
    damaged_records,
    load_records,
    note,
    outcome_sets,
    read_all_samples,
    repair_name,
    run_label,
)
from mka_exp.report.sensitivity import ID_COLUMNS, calibration_sensitivity, one_answer_runs
from mka_exp.results.records import comparable_view

PRUNING_METHODS = registry.of_family("pruning")  # the default baseline: the best of these
MERGING_METHODS = registry.of_family("merging")  # what "does merging beat pruning?" compares
BEST_PRUNING = "best pruning"  # the default baseline's name
# A random guess among the choices. BoolQ's line is the majority answer's share of the evaluated
# examples instead, where per-example records give it: a model that always says "yes" gets that.
CHANCE = {"piqa": 0.5, "hellaswag": 0.25, "race": 0.25, "mmlu": 0.25, "boolq": 0.5}
MAJORITY_TASKS = ("boolq",)
MARK = "*"


@dataclass(frozen=True)
class Boot:
    """Bootstrap settings (only macro averages resample: MMLU's intervals)."""

    resamples: int = stats.N_RESAMPLES
    seed: int = stats.SEED


@dataclass
class Stats:
    """Intervals and paired differences for every record with per-example records.

    `accuracy`: one row per record × task metric (`column` = "<task> <metric>"; MMLU's is
    `acc_macro`): value, low, high (95 %), n. `differences`: one row per compressed record ×
    column against its column's baseline: the paired difference, its interval, McNemar's p,
    `mde`. `baselines`: per model, quantizer, layer count and column, the composite baseline's
    description. `primary`: the declared comparisons with Holm's p within each family.
    `retained`: each run at its model's cut(s) nearest 25 % as a share of dense (`retained`).
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
    baselines: pd.DataFrame = field(default_factory=pd.DataFrame)
    primary: pd.DataFrame = field(default_factory=pd.DataFrame)
    declarations: list[declared.Declaration] = field(default_factory=list)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)  # per-example rows per run
    merging: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `merging_vs_pruning`
    distance: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `distance.dense_distances`
    distance_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # declared pairs in KL
    retained: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `retained.retained_rows`
    retained_notes: list[str] = field(default_factory=list)  # runs with no dense run to pair
    repair_fits: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `repair_fits.fit_rows`


def accuracy_interval(outcomes: pd.DataFrame, metric: str, boot: Boot) -> stats.Interval:
    if metric.endswith("_macro"):
        return stats.macro_interval(outcomes["y"], outcomes["subtask"],
                                    n_resamples=boot.resamples, seed=boot.seed)  # fmt: skip
    return stats.wilson(outcomes["y"])


def accuracy_rows(df: pd.DataFrame, frames: dict, boot: Boot) -> tuple[pd.DataFrame, dict]:
    """One row per run × task metric with its interval; the outcome sets by (hash, column)."""
    rows, sets = [], {}
    for _, run in df[df["config_hash"].isin(frames)].iterrows():
        for (task, metric), outcomes in outcome_sets(frames[run["config_hash"]]).items():
            interval = accuracy_interval(outcomes, metric, boot)
            column_name = f"{task} {metric}"
            sets[(run["config_hash"], column_name)] = outcomes
            ident = {k: run[k] for k in ID_COLUMNS}
            rows.append({**ident, "task": task, "metric": metric, "column": column_name,
                         "value": interval.value, "low": interval.low, "high": interval.high,
                         "n": interval.n, "groups": outcomes["subtask"].nunique()})  # fmt: skip
    columns = [*ID_COLUMNS, "task", "metric", "column", "value", "low", "high", "n", "groups"]
    return pd.DataFrame(rows, columns=columns), sets


def compute_stats(
    df: pd.DataFrame,
    root: Path,
    baseline: str | None = None,
    boot: Boot = Boot(),
    declarations: list[declared.Declaration] | None = None,
) -> Stats:
    """Intervals, paired differences against the baseline, repair effects, the declared
    comparisons (Holm within each family), distance to the dense model and calibration
    sensitivity."""
    records = load_records(root)
    df = df.assign(removed=column(df, "layers_before") - column(df, "layers_after"))
    check_baseline(df, baseline)
    frames, notes = read_all_samples(df, records, root)
    notes += damaged_notes(root)
    accuracy, sets = accuracy_rows(df, frames, boot)
    composites, baselines, more = baseline_composites(accuracy, sets, baseline)
    differences, more2 = paired_differences(accuracy, sets, composites, boot)
    repair = repair_effects(accuracy, sets, records, boot)
    pair = partial(paired_cells, boot=boot)
    primary, more3 = declared.primary_comparisons(
        declarations or [], accuracy, sets, composites, repair, records, pair
    )
    dist, per_example = distance.dense_distances(accuracy, frames, boot.resamples, boot.seed)
    notes = pd.DataFrame(notes + more + more2 + more3, columns=NOTE_COLUMNS).drop_duplicates()
    st = Stats(accuracy, differences, notes, calibration_sensitivity(df, records),
               chance_levels(sets), baseline or BEST_PRUNING, repair, one_answer_runs(df, frames),
               baselines, primary, declarations or [], frames, distance=dist)  # fmt: skip
    if not baseline:  # a --baseline METHOD answers another question
        st.merging = merging_vs_pruning(accuracy, sets, composites, boot)
    st.repair_fits = repair_fits.fit_rows(accuracy, records)
    st.distance_pairs = distance.declared_distances(primary, per_example, boot.resamples, boot.seed)
    st.retained, st.retained_notes = retained.retained_rows(
        accuracy, sets, boot.resamples, boot.seed
    )
    return st


NOTE_COLUMNS = ["model", "quantizer", "removed", "text"]


def damaged_notes(root: Path) -> list[dict]:
    damaged = damaged_records(root)
    if not damaged:
        return []
    text = f"{len(damaged)} damaged record(s), not read and left where they are: "
    return [{"model": None, "quantizer": None, "removed": None, "text": text + "; ".join(damaged)}]


def baseline_composites(
    accuracy: pd.DataFrame, sets: dict, baseline: str | None
) -> tuple[dict, pd.DataFrame, list[dict]]:
    """Per model, quantizer, layer count and column: the cross-fitted best run of the baseline
    pool (pruning methods, or `baseline`'s runs), on the examples of the pool's first run."""
    return composites_of(accuracy, sets, [baseline] if baseline else list(PRUNING_METHODS))


def composites_of(
    accuracy: pd.DataFrame, sets: dict, wanted: list[str]
) -> tuple[dict, pd.DataFrame, list[dict]]:
    """The cross-fitted best run of `wanted`'s runs per column and cut, its description, notes."""
    composites, rows, notes = {}, [], []
    for key, group in accuracy[accuracy["removed"] > 0].groupby(GROUP, sort=False):
        pool = group[group["method"].isin(wanted)]
        if pool.empty:
            text = f"no baseline at {int(group['removed'].iloc[0])} layers removed for "
            text += f"{key[-1]}: no {' or '.join(wanted)} record with per-example records there"
            notes.append(note(group.iloc[0], text))
            continue
        members, first = [], sets[(pool["config_hash"].iloc[0], key[-1])]
        for _, run in pool.iterrows():
            outcomes = sets[(run["config_hash"], key[-1])]
            if align(first, outcomes)[1]:
                notes.append(note(run, f"{run_label(run)} left out of the {key[-1]} baseline: "
                                       "evaluated on other examples"))  # fmt: skip
                continue
            members.append((run["config_hash"], run_label(run), outcomes))
        macro = str(pool["metric"].iloc[0]).endswith("_macro")
        composites[key] = crossfit.cross_fit(members, macro)
        rows.append(dict(zip(GROUP, key, strict=True)) | {
            "removed": int(group["removed"].iloc[0]), "runs": len(members),
            "baseline": composites[key].describe()})  # fmt: skip
    return composites, pd.DataFrame(rows), notes


def paired_differences(
    accuracy: pd.DataFrame, sets: dict, composites: dict, boot: Boot
) -> tuple[pd.DataFrame, list[dict]]:
    """Every compressed run against its column's composite baseline."""
    rows, notes = [], []
    for _, row in accuracy[accuracy["removed"] > 0].iterrows():
        composite = composites.get(tuple(row[GROUP]))
        if composite is None:
            continue
        aligned, problem = align(sets[(row["config_hash"], row["column"])], composite.outcomes)
        if problem:
            text = f"paired test impossible: {run_label(row)} and the baseline were evaluated on "
            notes.append(note(row, text + f"different {row['task']} examples ({problem})"))
            continue
        out = {k: row[k] for k in ID_COLUMNS} | {"column": row["column"], "metric": row["metric"]}
        out |= {"baseline": composite.describe(), "baseline_hash": "+".join(composite.hashes)}
        rows.append(out | paired_cells(aligned, row["metric"], boot))
    return pd.DataFrame(rows), notes


def merging_vs_pruning(
    accuracy: pd.DataFrame, sets: dict, pruning: dict, boot: Boot
) -> pd.DataFrame:
    """Per column and cut: the cross-fitted best merging run minus the cross-fitted best pruning
    run (both chosen on the other half of the examples), paired."""
    merging, _, _ = composites_of(accuracy, sets, list(MERGING_METHODS))
    rows = []
    for key, composite in merging.items():
        if key not in pruning:
            continue
        aligned, problem = align(composite.outcomes, pruning[key].outcomes)
        if problem:
            continue
        metric = key[-1].split(" ", 1)[1]
        row = accuracy[(accuracy[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)].iloc[0]
        rows.append(dict(zip(GROUP, key, strict=True)) | {
            "removed": row["removed"], "metric": metric, "merging": composite.describe(),
            "pruning": pruning[key].describe(), "config_hash": "+".join(composite.hashes),
            "baseline_hash": "+".join(pruning[key].hashes)} | paired_cells(aligned, metric, boot))  # fmt: skip
    return pd.DataFrame(rows)


def paired_cells(aligned: pd.DataFrame, metric: str, boot: Boot) -> dict:
    """The paired difference of aligned outcomes (MMLU's macro: resampled by subject)."""
    groups = aligned["subtask"] if metric.endswith("_macro") else None
    result = stats.paired(aligned["y_a"], aligned["y_b"], groups, n_resamples=boot.resamples,
                          seed=boot.seed)  # fmt: skip
    d = result.difference
    return {"difference": d.value, "low": d.low, "high": d.high, "p_value": result.p_value,
            "a_only": result.a_only, "b_only": result.b_only, "n": d.n, "mde": result.mde,
            "excludes_zero": d.excludes(0.0)}  # fmt: skip


def twin_key(record: dict) -> str:
    """The record's config without its repair and without what the config hash leaves out
    (paths, caches, loggers): equal for repair twins, wherever each ran."""
    config = comparable_view(record.get("config") or {})
    config = json.loads(json.dumps(config, default=str))
    for part in (config, config.get("calib") or {}, config.get("eval") or {}):
        part.pop("data_root", None)
    config.pop("repair", None)
    return json.dumps(config, sort_keys=True)


def repair_effects(
    accuracy: pd.DataFrame, sets: dict, records: dict[str, dict], boot: Boot
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
        ident = {k: row[k] for k in ID_COLUMNS} | {"column": row["column"], "metric": row["metric"]}
        rows.append(ident | {"repair": names[row["config_hash"]], "baseline_hash": twin}
                    | paired_cells(aligned, row["metric"], boot))  # fmt: skip
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


def chance_levels(sets: dict) -> dict[str, tuple[float, str]]:
    """Task -> (chance accuracy, how it was chosen), for the plots' reference line."""
    levels = {task: (level, "random guess") for task, level in CHANCE.items()}
    for (_, column_name), outcomes in sets.items():
        task = column_name.split(" ", 1)[0]
        if task in MAJORITY_TASKS and levels[task][1] == "random guess":
            share = outcomes["target"].astype(str).value_counts(normalize=True).iloc[0]
            levels[task] = (float(share), "majority answer")
    return levels
