"""Paper-style report from many runs: our numbers beside the paper's, as tables and figures.

    python -m mka_exp.report outputs/ [--out DIR] [--wandb]
    python -m mka_exp.report outputs/results.csv

Reads the run table (an outputs dir is rebuilt from its `records/`, so it is always complete; a
CSV is read as is) and writes into `--out` (default `<outputs dir>/report`):

- `table1.{md,csv}`  model × method × quantizer → MMLU and compression ratio (paper Table 1)
- `table2.{md,csv}`  model × method × compression ratio → MMLU, PIQA, HellaSwag, RACE-H, BoolQ
- `table3_4.{md,csv}` model × method × retained layers → MMLU (paper Tables 3-4)
- `plots/curve_<model>_<task>.png`  accuracy vs compression ratio, one line per method (Fig. 2)
- `heatmaps/*.png`  every `similarity_*.npy` found under the outputs dir (Fig. 3)
- `report.md`  an index of all of the above
- from an outputs dir, per-example records (`mka_exp.samples`) give `accuracy_intervals.csv`
  (95 % interval on every accuracy), `paired_differences.csv` (each compressed run minus the
  baseline: `--baseline METHOD`, default the best pruning run at the same layer count; paired
  bootstrap interval, McNemar exact p), `calibration_sensitivity.csv`, `one_answer.csv` (runs
  that give one answer to >= 90 % of a task: their accuracy there is a base rate) and
  `statistics.md` (`mka_exp.stats`); `--markdown docs/method_comparison.md` writes the
  comparison document

Accuracies are in percent like the paper's; each `<task>_paper` column holds the published
number (`mka_exp/paper_results.csv`) where model, method, quantizer and ratio (or retained layers)
match. MMLU is the macro average over subjects when a run has it (the paper's script averaged per
subject), else lm-eval's group score. Runs of one method that differ in other settings (λ, pair
choice, calibration, ...) get a `variant` label built from the config keys that differ.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mka_exp import samples as samples_mod
from mka_exp import stats
from mka_exp.choices import did_you_mean
from mka_exp.plots import similarity_heatmap
from mka_exp.results import (
    NON_RESULT_KEYS,
    config_hash,
    rebuild_table,
    without_keys,
    write_bytes_atomic,
)

# Our model config names → the paper's model names.
PAPER_MODELS = {
    "llama3_8b": "Llama3-8B",
    "llama3_70b": "Llama3-70B",
    "llama2_7b": "Llama2-7B",
    "llama2_13b": "Llama2-13B",
    "mistral_7b": "Mistral-7B",
}
# Our method module names → the paper's (paper_results.csv spells them the same; angular is ours).
PAPER_METHODS = {
    "none": "none",
    "reverse_prune": "reverse_prune",
    "shortgpt": "shortgpt",
    "mka": "mka",
    "sparsegpt": "sparsegpt",
}
# Our task names → the paper's (RACE is RACE-high in both; the paper's file says race_h).
PAPER_TASKS = {
    "mmlu": "mmlu",
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "race": "race_h",
    "boolq": "boolq",
}
TASKS = tuple(PAPER_TASKS)
METHOD_ORDER = ("none", "reverse_prune", "shortgpt", "angular", "mka", "sparsegpt")
# Paper ratios are printed to 5 decimals and step by ≥ 1/80: this tolerance matches one point only.
RATIO_TOL = 1e-3
# Config keys that do not name a different experiment (where files go, how it is logged, where it
# ran) or are already a table column (ratio, layer count; a curve's points); prefixes of dotted
# keys. Runs that differ only in these still get told apart, by config hash.
NOT_VARIANT = (*NON_RESULT_KEYS, "data_root", "save", "curve")
NOT_VARIANT_LEAVES = ("ratio", "num_layers", "_target_", "data_root", "cache", "device")
NOT_VARIANT_LEAVES += ("device_map", "batch_size")
MAX_VARIANT_KEYS = 4


class ReportError(Exception):
    """Bad input (missing path, no runs): reported as one line, exit code 2."""


@dataclass
class Report:
    """What a report wrote: tables by name (with their files) and figure paths."""

    out: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)
    stats: Stats | None = None
    statistics: str = ""  # the statistics sections as markdown


# ---------------------------------------------------------------- input


def load_table(path: Path) -> tuple[pd.DataFrame, Path]:
    """The run table and the outputs dir it belongs to (where similarity .npy files are sought)."""
    if not path.exists():
        raise ReportError(f"{path}: no such file or directory")
    if path.is_dir():
        table = rebuild_table(path)
        if table.empty:
            raise ReportError(f"{path}: no run records found (expected {path / 'records'}/*.json)")
        return attach_configs(table, path), path
    try:
        table = pd.read_csv(path, dtype={"config_hash": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not a readable results table ({err})") from None
    if table.empty:
        raise ReportError(f"{path}: the results table has no rows")
    return table, path.parent


def attach_configs(table: pd.DataFrame, outputs: Path) -> pd.DataFrame:
    """Add each record's resolved config as `config.<dotted key>` columns (variant labels)."""
    rows = []
    for file in sorted((outputs / "records").glob("*.json")):
        record = json.loads(file.read_text())
        flat = pd.json_normalize(record.get("config") or {}, sep=".").iloc[0].to_dict()
        row = {f"config.{k}": v if np.isscalar(v) or v is None else label_cell(v)
               for k, v in flat.items()}  # fmt: skip
        rows.append({"config_hash": record.get("config_hash"), **row})
    configs = pd.DataFrame(rows)
    if "config_hash" not in table or configs.empty:
        return table
    return table.merge(configs.drop_duplicates("config_hash"), on="config_hash", how="left")


def column(table: pd.DataFrame, name: str) -> pd.Series:
    """A column as floats, or all-NaN when the table lacks it (runs evaluate different tasks)."""
    if name in table:
        return pd.to_numeric(table[name], errors="coerce")
    return pd.Series(np.nan, index=table.index)


def prepare(table: pd.DataFrame) -> pd.DataFrame:
    """Our runs with the derived columns every table and plot uses: ratio, variant, acc in %."""
    df = table.copy()
    for name, default in (("model", "?"), ("method", "?"), ("quantizer", "none")):
        df[name] = df[name].fillna(default).astype(str) if name in df else default
    df["compression_ratio"] = compression_ratio(df)
    df["paper_ratio"] = column(df, "paper_compression_ratio").fillna(df["compression_ratio"])
    # The paper averaged MMLU per subject; lm-eval's group score weights subjects by size.
    mmlu = column(df, "metrics.mmlu/acc_macro").fillna(column(df, "metrics.mmlu/acc"))
    df["mmlu"] = 100 * mmlu
    for task in TASKS[1:]:
        df[task] = 100 * column(df, f"metrics.{task}/acc")
    if "config.repair._target_" in df:  # the repair stage's option name, e.g. "linear"
        df["config.repair.name"] = df["config.repair._target_"].map(repair_name)
    df["variant"] = variants(df)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    df["_order"] = df["method"].map(order).fillna(len(order))
    return df.sort_values(["model", "_order", "variant", "quantizer", "compression_ratio"])


def compression_ratio(df: pd.DataFrame) -> pd.Series:
    """Fraction removed: decoder layers for layer methods, weights for SparseGPT (its target)."""
    layers = column(df, "layer_ratio")
    if layers.isna().all() and {"layers_before", "layers_after"} <= set(df):
        layers = 1 - column(df, "layers_after") / column(df, "layers_before")
    sparsity = column(df, "method_stats.target_sparsity")
    return sparsity.where(sparsity.notna() & (layers.fillna(0) == 0), layers).round(6)


def variants(df: pd.DataFrame) -> pd.Series:
    """A label per run from the config keys that differ among runs of its model/method/quant."""
    keys = [c for c in df if c.startswith("config.") and is_variant_key(c[len("config.") :])]
    labels = pd.Series("", index=df.index)
    for _, group in df.groupby(["model", "method", "quantizer"]):
        # Keys only some runs have (a repair's options) tell runs apart only by their values.
        differing = [k for k in keys if group[k].dropna().astype(str).nunique() > 1]
        differing = differing[:MAX_VARIANT_KEYS]
        for idx, row in group.iterrows():
            parts = [f"{short_key(k)}={label_cell(row[k])}" for k in differing if notna(row[k])]
            repair = row.get("config.repair.name")
            if notna(repair) and repair != "none" and "config.repair.name" not in differing:
                parts.insert(0, f"repair={repair}")  # a repaired run says so even alone
            labels[idx] = ", ".join(parts)  # a key a run lacks is left out of its label
    # Runs still indistinguishable (e.g. a CSV without configs): tell them apart by config hash.
    key = ["model", "method", "quantizer", "compression_ratio"]
    clash = df.assign(variant=labels).duplicated(key + ["variant"], keep=False)
    if clash.any() and "config_hash" in df:
        hashes = df.loc[clash, "config_hash"].astype(str).str[:8]
        labels[clash] = (labels[clash] + " #" + hashes).str.strip()
    return labels


def repair_name(target: object) -> object:
    """`mka_exp.repair.linear.LinearRepair` -> `linear` (the module is the option's name)."""
    return target.split(".")[-2] if isinstance(target, str) and target.count(".") > 1 else target


def label_cell(value: object) -> str:
    """A variant's value: a list (a task list) as `a+b`, anything else as in a table cell."""
    return "+".join(map(str, value)) if isinstance(value, list | tuple) else cell(value)


def notna(value: object) -> bool:
    return not (isinstance(value, float) and np.isnan(value)) and value is not None


def is_variant_key(key: str) -> bool:
    return not key.startswith(NOT_VARIANT) and key.rsplit(".", 1)[-1] not in NOT_VARIANT_LEAVES


SHORT_KEYS = {"repair.name": "repair", "eval.tasks": "tasks"}  # config key -> variant label


def short_key(column_name: str) -> str:
    key = column_name[len("config.") :]
    if key in SHORT_KEYS:
        return SHORT_KEYS[key]
    return key[len("method.") :] if key.startswith("method.") else key


# ---------------------------------------------------------------- the paper's numbers


def load_paper() -> pd.DataFrame:
    """The paper's published numbers in long form, with our model and task names."""
    with resources.files("mka_exp").joinpath("paper_results.csv").open() as fh:
        paper = pd.read_csv(fh)
    models = {v: k for k, v in PAPER_MODELS.items()}
    methods = {v: k for k, v in PAPER_METHODS.items()}
    tasks = {v: k for k, v in PAPER_TASKS.items()}
    return paper.assign(
        model=paper["model"].map(models).fillna(paper["model"]),
        method=paper["method"].map(methods).fillna(paper["method"]),
        task=paper["task"].map(tasks).fillna(paper["task"]),
    )


def paper_value(paper: pd.DataFrame, run: pd.Series, task: str, by_layers: bool) -> float:
    """The published accuracy for this run's model/method/quantizer/point, NaN when none.

    Any of the paper's tables may hold the point (the baseline is in Tables 1-3, ShortGPT's
    MMLU curve only in Table 2); where tables overlap, their numbers agree."""
    hits = paper[
        (paper["model"] == run["model"])
        & (paper["method"] == run["method"])
        & (paper["quantizer"] == run["quantizer"])
        & (paper["task"] == task)
    ]
    if by_layers:  # Table 1's ratios count every quantizer as int4: match retained layers
        hits = hits[hits["retained_layers"] == run.get("layers_after")]
    else:
        hits = hits[(hits["compression_ratio"] - run["compression_ratio"]).abs() < RATIO_TOL]
    return float(hits["acc"].iloc[0]) if len(hits) else np.nan


def with_paper(
    df: pd.DataFrame,
    paper: pd.DataFrame,
    tasks: tuple[str, ...],
    by_layers: bool = False,
) -> pd.DataFrame:
    """Each task's column of ours followed by `<task>_paper`."""
    out = df.copy()
    for task in tasks:
        out[f"{task}_paper"] = [
            paper_value(paper, run, task, by_layers) for _, run in df.iterrows()
        ]
    return out


# ---------------------------------------------------------------- tables


def table1(df: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 1: compressed + quantized runs (and uncompressed baselines) → MMLU."""
    runs = df[((df["quantizer"] != "none") | (df["method"] == "none")) & df["mmlu"].notna()]
    runs = with_paper(runs, paper, ("mmlu",), by_layers=True)
    runs["compression_ratio_paper"] = [
        paper_ratio(paper, run) if pd.notna(run["mmlu_paper"]) else np.nan
        for _, run in runs.iterrows()
    ]
    columns = ["model", "method", "variant", "quantizer", "weight_bits", "layers_before"]
    columns += ["layers_after", "paper_ratio", "compression_ratio_paper", "mmlu", "mmlu_paper"]
    return finish(runs, columns).rename(columns={"paper_ratio": "compression_ratio"})


def paper_ratio(paper: pd.DataFrame, run: pd.Series) -> float:
    hits = paper[
        (paper["table"] == "table1")
        & (paper["model"] == run["model"])
        & (paper["retained_layers"] == run.get("layers_after"))
    ]
    return float(hits["compression_ratio"].iloc[0]) if len(hits) else np.nan


def table2(df: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 2: unquantized runs × compression ratio → the five tasks, ours beside paper."""
    runs = df[(df["quantizer"] == "none") & df[list(TASKS)].notna().any(axis=1)]
    runs = with_paper(runs, paper, TASKS)
    columns = ["model", "method", "variant", "compression_ratio", "layers_after"]
    columns += [c for task in TASKS for c in (task, f"{task}_low", f"{task}_high", f"{task}_paper")]
    return finish(runs, columns)


def table3_4(df: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Paper Tables 3-4: the MMLU compression curve, one row per retained-layer count."""
    runs = df[(df["quantizer"] == "none") & df["mmlu"].notna()]
    runs = with_paper(runs, paper, ("mmlu",))
    columns = ["model", "method", "variant", "layers_before", "layers_after"]
    columns += ["compression_ratio", "mmlu", "mmlu_low", "mmlu_high", "mmlu_paper"]
    return finish(runs, columns)


def finish(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Keep the table's columns (missing ones blank), accuracies to 2 decimals like the paper."""
    out = runs.reindex(columns=columns).reset_index(drop=True)
    accs = [c for c in columns if is_accuracy(c)]
    out[accs] = out[accs].astype(float).round(2)
    ratios = [c for c in columns if "ratio" in c]
    out[ratios] = out[ratios].astype(float).round(5)
    return out


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-markdown table (no tabulate dependency); blanks for missing values; a column's
    `<name>_low`/`<name>_high` columns are shown in its cell as `value [low, high]`."""
    if table.empty:
        return "_no matching runs_\n"
    table = fold_intervals(table)
    digits = [2 if is_accuracy(c) else None for c in table.columns]
    rows = table.itertuples(index=False)
    cells = [[cell(v, d) for v, d in zip(row, digits, strict=True)] for row in rows]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def fold_intervals(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for name in [c for c in table if {f"{c}_low", f"{c}_high"} <= set(table)]:
        digits = 2 if is_accuracy(name) else None
        bounds = zip(table[name], table[f"{name}_low"], table[f"{name}_high"], strict=True)
        out[name] = [
            cell(v, digits) + (f" [{cell(lo, digits)}, {cell(hi, digits)}]" if pd.notna(lo) else "")
            for v, lo, hi in bounds
        ]
        out = out.drop(columns=[f"{name}_low", f"{name}_high"])
    return out


def is_accuracy(column_name: str) -> bool:
    name = column_name.removesuffix("_paper").removesuffix("_low").removesuffix("_high")
    return name in TASKS


def with_intervals(df: pd.DataFrame, st: Stats | None) -> pd.DataFrame:
    """`<task>_low`/`<task>_high` (%) beside each task column, from the per-example records
    (NaN where a run has none); the interval of the metric the column holds (MMLU: macro)."""
    out = df.copy()
    for task in TASKS:
        names = [f"{task} acc_macro", f"{task} acc"] if task == "mmlu" else [f"{task} acc"]
        for bound in ("low", "high"):
            out[f"{task}_{bound}"] = np.nan
            for name in reversed(names):  # the first name wins
                if st is None or st.accuracy.empty:
                    break
                rows = st.accuracy[st.accuracy["column"] == name].set_index("config_hash")
                mapped = out["config_hash"].map(100 * rows[bound]) if "config_hash" in out else None
                if mapped is not None:
                    out[f"{task}_{bound}"] = mapped.where(mapped.notna(), out[f"{task}_{bound}"])
    return out


def cell(value: object, digits: int | None = None) -> str:
    """Blank for missing; accuracies with fixed decimals like the paper; else shortest form."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if digits is not None and isinstance(value, int | float):
        return f"{value:.{digits}f}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- statistics (per-example records)


# What a record's accuracy is compared against by default: the best of these at its layer count.
PRUNING_METHODS = ("reverse_prune", "shortgpt", "angular", "sleb")
MERGING_METHODS = ("mka", "laco")  # what "does merging beat pruning?" compares
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


def load_records(root: Path) -> dict[str, dict]:
    records = (json.loads(p.read_text()) for p in sorted((root / "records").glob("*.json")))
    return {r["config_hash"]: r for r in records if "config_hash" in r}


def run_label(run: pd.Series | dict, model: bool = False) -> str:
    """`method (variant)`; with `model`, `model method (variant) -<layers removed>`."""
    variant = f" ({run['variant']})" if run.get("variant") else ""
    if not model:
        return f"{run['method']}{variant}"
    return f"{run['model']} {run['method']}{variant} -{int(run['removed'])}"


def outcome_sets(frame: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """(task, metric) -> the outcomes under it (`subtask`, `doc_id`, hashes, `y`); a task with
    several subtasks (MMLU) is scored as their macro average, so its metric is `<m>_macro`."""
    frame = frame[frame["filter"] == "none"]
    sets = {}
    for task, rows in frame.groupby("task", sort=False):
        macro = rows["subtask"].nunique() > 1
        for metric in samples_mod.METRICS:
            kept = rows[rows[metric].notna()]
            if not kept.empty:
                name = f"{metric}_macro" if macro else metric
                keys = ["subtask", "doc_id", "doc_hash", "prompt_hash", "target"]
                sets[(str(task), name)] = kept[keys].assign(y=kept[metric].to_numpy())
    return sets


def accuracy_interval(outcomes: pd.DataFrame, metric: str, resamples: int) -> stats.Interval:
    if metric.endswith("_macro"):
        return stats.macro_interval(outcomes["y"], outcomes["subtask"], n_resamples=resamples)
    return stats.wilson(outcomes["y"])


def read_all_samples(
    df: pd.DataFrame, records: dict[str, dict], root: Path
) -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Each run's per-example rows; a note for runs without them or with a damaged file."""
    frames, notes, older = {}, [], []
    for _, run in df.iterrows():
        record = records.get(run["config_hash"], {})
        try:
            frame = samples_mod.read_samples(root, record)
        except samples_mod.SamplesError as err:
            notes.append(note(run, f"{err}: no interval or paired test for {run_label(run, True)}"))
            continue
        if frame is None:
            older.append(run_label(run, model=True))
        else:
            frames[run["config_hash"]] = frame
    if older:
        text = f"{len(older)} record(s) without per-example records (older runs; no interval, "
        text += f"no paired test): {', '.join(older)}"
        notes.append({"model": None, "quantizer": None, "removed": None, "text": text})
    return frames, notes


def note(run: pd.Series, text: str) -> dict:
    return {
        "model": run["model"],
        "quantizer": run["quantizer"],
        "removed": run["removed"],
        "text": text,
    }


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


def one_answer_lines(st: Stats, model: str, quant: str) -> list[str]:
    flagged = of_model(st.one_answer, model, quant) if not st.one_answer.empty else st.one_answer
    return [""] * (not flagged.empty) + [
        f"- {run_label(r)} -{int(r['removed'])} gives one answer ({r['answer']}) to "
        f"{percent(r['share'])} % of {r['task']}'s {r['n']} examples; {percent(r['target_share'])}"
        f" % of the targets are {r['answer']}, so its {r['task']} accuracy is that base rate, "
        "not what the compression kept."
        for _, r in flagged.iterrows()
    ]


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


def column_order(name: str) -> tuple:
    """Our five tasks in the paper's order first, then others; acc before acc_norm."""
    task, _, metric = name.partition(" ")
    rank = TASKS.index(task) if task in TASKS else len(TASKS)
    return (rank, task, metric)


# ---------------------------------------------------------------- statistics as markdown


def percent(value: float, sign: bool = False) -> str:
    return "" if pd.isna(value) else f"{100 * value:{'+' if sign else ''}.1f}"


def interval_cell(row: pd.Series) -> str:
    return f"{percent(row['value'])} [{percent(row['low'])}, {percent(row['high'])}]"


def difference_cell(row: pd.Series) -> str:
    if row.get("is_baseline") is True:
        return "baseline"
    mark = MARK if row["significant"] else ""
    span = f"[{percent(row['low'], True)}, {percent(row['high'], True)}]"
    return f"{percent(row['difference'], True)} {span}{mark} {p_text(row['p_value'])}"


def p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def pivot(long: pd.DataFrame, cells: pd.Series, index: list[str]) -> pd.DataFrame:
    """One row per run, one column per task metric (in the paper's task order)."""
    wide = long.assign(cell=cells).pivot_table(
        index=index, columns="column", values="cell", aggfunc="first", sort=False
    )
    wide = wide[sorted(wide.columns, key=column_order)].fillna("")
    return wide.reset_index().rename(columns={"config_hash": "run"})


def stats_markdown(st: Stats, records: dict[str, dict]) -> str:
    """Sections per model: accuracies with intervals, then one comparison per layer count."""
    lines = [f"- {t}" for t in st.notes[st.notes["model"].isna()]["text"]]
    for (model, quant), acc in st.accuracy.groupby(["model", "quantizer"], sort=False):
        title = model if quant == "none" else f"{model} + {quant}"
        lines += [f"\n## {title}\n", examples_line(acc) + "\n", ACCURACY_HEADING]
        lines.append(accuracy_table(acc, records))
        lines += one_answer_lines(st, model, quant)
        lines += [COST_HEADING, cost_table(acc, records)]
        for removed in sorted(set(acc["removed"]) - {0}):
            lines += comparison_section(
                st, model, quant, removed, int(acc["layers_before"].iloc[0])
            )
        lines += repair_section(st, model, quant)
        lines += merging_section(st, model, quant)
    if not st.sensitivity.empty:
        lines += ["\n## Calibration sensitivity\n", sensitivity_text(st.sensitivity)]
    return "\n".join(lines) + "\n"


ACCURACY_HEADING = """### Accuracy (%, 95 % interval)

"layers removed": original layer indices; for MKA and LaCo each merge as kept+merged (the kept
layer holds the merge).
"""


COST_HEADING = """
### Cost (seconds, memory)

Wall seconds of each stage as recorded (one process; a curve's later points reuse the repair's
dense capture, so its capture seconds are counted once per process). "repair holds": the dense
hidden states and the largest fit's normal equations and cached inputs the repair keeps beside
the models; "peak RSS": the whole process.
"""


def cost_table(acc: pd.DataFrame, records: dict[str, dict]) -> str:
    runs = acc.drop_duplicates("config_hash")
    rows = []
    for _, run in runs.iterrows():
        record = records.get(run["config_hash"], {})
        timings = record.get("timings") or {}
        repair = ("repair_capture", "repair")
        held = (record.get("repair_stats") or {}).get("held_bytes")
        rows.append({
            "method": run["method"], "variant": run["variant"], "removed": run["removed"],
            "method s": seconds_cell(timings.get("compress")),
            "repair s (capture + fit)": " + ".join(seconds_cell(timings.get(k)) for k in repair)
            if any(k in timings for k in repair) else "",
            "repair holds": f"{held / 2**20:,.0f} MiB" if held else "",
            "evaluate s": seconds_cell(timings.get("evaluate")),
            "peak RSS": f"{record['peak_rss_bytes'] / 2**30:.1f} GiB"
            if record.get("peak_rss_bytes") else "",
        })  # fmt: skip
    return markdown(pd.DataFrame(rows))


def seconds_cell(value: object) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else ""


def examples_line(acc: pd.DataFrame) -> str:
    parts = []
    for name in sorted(set(acc["column"]), key=column_order):
        rows = acc[acc["column"] == name]
        if name.endswith("_norm") and name.replace("acc_norm", "acc") in set(acc["column"]):
            continue
        counts = "/".join(str(n) for n in sorted(set(rows["n"])))
        groups = int(rows["groups"].max())
        parts.append(
            f"{name.split()[0]} {counts}" + (f" ({groups} subjects)" if groups > 1 else "")
        )
    return "Examples per task: " + ", ".join(parts) + "."


def accuracy_table(acc: pd.DataFrame, records: dict[str, dict]) -> str:
    wide = pivot(
        acc, acc.apply(interval_cell, axis=1), ["config_hash", "method", "variant", "removed"]
    )
    removed = [layers_text(records.get(h, {})) for h in wide["run"]]
    wide.insert(4, "layers removed", removed)
    return markdown(wide.drop(columns="run"))


def layers_text(record: dict) -> str:
    choice = layer_choice(record.get("method_stats") or {})
    if choice and isinstance(choice[0], tuple):
        return " ".join("+".join(map(str, merge)) for merge in choice)  # kept+merged
    return "" if choice is None else " ".join(map(str, choice))


def of_model(frame: pd.DataFrame, model: str, quant: str) -> pd.DataFrame:
    """The rows of one model + quantizer (each model's section of the statistics)."""
    return frame[(frame["model"] == model) & (frame["quantizer"] == quant)]


def comparison_section(st: Stats, model: str, quant: str, removed: int, total: int) -> list[str]:
    diffs = st.differences
    if not diffs.empty:
        diffs = of_model(diffs, model, quant)
        diffs = diffs[diffs["removed"] == removed]
    notes = of_model(st.notes, model, quant)
    notes = notes[notes["removed"] == removed]
    lines = [f"\n### Against {st.baseline} at {removed} of {total} layers removed\n"]
    if not diffs.empty:
        base = diffs.drop_duplicates("column").sort_values(
            "column", key=lambda c: c.map(column_order)
        )
        named = "; ".join(f"{r['column']}: {r['baseline']}" for _, r in base.iterrows())
        lines.append(f"Baseline per column: {named}. Difference in points, 95 % paired bootstrap "
                     f"interval, `{MARK}` = excludes 0, McNemar exact p.\n")  # fmt: skip
        wide = pivot(
            diffs, diffs.apply(difference_cell, axis=1), ["config_hash", "method", "variant"]
        )
        lines.append(markdown(wide.drop(columns="run")))
    lines += [f"- {text}" for text in notes["text"]]
    return lines


def repair_section(st: Stats, model: str, quant: str) -> list[str]:
    effects = st.repair
    if effects.empty:
        return []
    effects = of_model(effects, model, quant)
    if effects.empty:
        return []
    wide = pivot(effects, effects.apply(difference_cell, axis=1),
                 ["config_hash", "method", "variant", "removed"])  # fmt: skip
    return [REPAIR_HEADING, markdown(wide.drop(columns="run"))]


def merging_section(st: Stats, model: str, quant: str) -> list[str]:
    """Per layer count and column, the best merging run against the best pruning run (the
    default baseline), and what the paired interval lets one say."""
    diffs = st.differences
    if diffs.empty or st.baseline != BEST_PRUNING:  # a --baseline METHOD answers another question
        return []
    diffs = of_model(diffs, model, quant)
    diffs = diffs[diffs["method"].isin(MERGING_METHODS) & ~diffs["is_baseline"].astype(bool)]
    if diffs.empty:
        return []
    flagged = one_answer_keys(st)
    diffs = diffs.assign(one_answer=diffs.apply(lambda r: one_answer_side(flagged, r), axis=1))
    best = diffs.loc[diffs.groupby(["removed", "column"], sort=False)["difference"].idxmax()]
    best = best.sort_values(["removed", "column"], key=sort_key)
    rows = [verdict_row(r) for _, r in best.iterrows()]
    readings = diffs.apply(reading, axis=1)
    above, below = (int((readings == side).sum()) for side in ("above", "below"))
    summary = (f"Of all {len(diffs)} merging results (run × column), {above} are above the best "
               f"pruning run beyond the interval, {below} below it, the rest within it.")  # fmt: skip
    one = int((diffs["one_answer"] != "").sum())
    if one:
        summary += (f" {one} of them compare a run that gives one answer to at least "
                    f"{100 * ONE_ANSWER_SHARE:.0f} % of the task's examples (see above): a base "
                    "rate, not a difference in what the models kept.")  # fmt: skip
    return [MERGING_HEADING, markdown(pd.DataFrame(rows)), "", summary]


def verdict_row(r: pd.Series) -> dict:
    return {"removed": r["removed"], "column": r["column"], "best pruning": r["baseline"],
            "best merging": run_label(r), "difference": difference_cell(r),
            "reading": reading(r), "one answer": r["one_answer"]}  # fmt: skip


def one_answer_keys(st: Stats) -> set[tuple[str, str]]:
    """(config hash, task) of every run × task that gives one answer."""
    if st.one_answer.empty:
        return set()
    return set(zip(st.one_answer["config_hash"], st.one_answer["task"], strict=True))


def one_answer_side(flagged: set[tuple[str, str]], diff: pd.Series) -> str:
    """Which side of a paired difference gives one answer to its task: merging, pruning, both."""
    if not flagged:
        return ""
    task = diff["column"].split(" ", 1)[0]
    sides = [name for name, key in (("merging", "config_hash"), ("pruning", "baseline_hash"))
             if (diff[key], task) in flagged]  # fmt: skip
    return "both" if len(sides) == 2 else "".join(sides)


def sort_key(values: pd.Series) -> pd.Series:
    return values.map(column_order) if values.name == "column" else values


def reading(row: pd.Series) -> str:
    if not row["significant"]:
        return "within the interval"
    return "above" if row["difference"] > 0 else "below"


MERGING_HEADING = """
### Does merging beat pruning?

Per layer count and column: the most accurate merging run (mka, laco; any variant and repair)
minus the most accurate pruning run (any variant and repair), paired on the same examples
(points, 95 % paired bootstrap interval, `*` = excludes 0, McNemar p).
"""


REPAIR_HEADING = """
### Repair against the same run without it

Each repaired run minus its twin with `repair=none` (the same config otherwise), paired on the
same examples: difference in points, 95 % paired bootstrap interval, `*` = excludes 0, McNemar p.
"""


def sensitivity_text(table: pd.DataFrame) -> str:
    """Per method and point: layer choices over the seeds and each accuracy's spread."""
    out = table[["model", "method", "variant", "removed", "seeds", "layer_choices",
                 "seeds_off_most_common"]].copy()  # fmt: skip
    names = sorted({c.rsplit(" ", 1)[0] for c in table if c.endswith(" mean")}, key=column_order)
    for name in names:
        out[name] = [
            f"{percent(m)} ± {percent(s)} (range {percent(r)})" if pd.notna(m) else ""
            for m, s, r in zip(table[f"{name} mean"], table[f"{name} sd"], table[f"{name} range"],
                               strict=True)
        ]  # fmt: skip
    intro = ("Runs that differ only in `calib.seed`: distinct layer choices over the seeds, seeds "
             "whose choice differs from the most common one, and each accuracy (%) as mean ± sd "
             "(range) over the seeds.\n\n")  # fmt: skip
    return intro + markdown(out)


# ---------------------------------------------------------------- figures


def new_figure(size: tuple[float, float] = (6.5, 4.5)) -> Figure:
    """A bare Agg figure: no pyplot state, no display, safe in any process."""
    fig = Figure(figsize=size, layout="constrained")  # fits labels without a second draw pass
    FigureCanvasAgg(fig)
    return fig


def curve_plots(
    df: pd.DataFrame, paper: pd.DataFrame, out: Path, chance: dict | None = None
) -> list[Path]:
    """Accuracy vs compression ratio per model and task, one line per method (paper Fig. 2),
    with 95 % error bars where per-example records give them, the dense model and chance."""
    runs = df[df["quantizer"] == "none"]
    chance = chance or {task: (level, "random guess") for task, level in CHANCE.items()}
    paths = []
    for model, group in runs.groupby("model"):
        for task in TASKS:
            if group[task].notna().any():
                paths.append(curve_plot(group, paper, str(model), task, out, chance.get(task)))
    return paths


def curve_plot(
    runs: pd.DataFrame,
    paper: pd.DataFrame,
    model: str,
    task: str,
    out: Path,
    chance: tuple[float, str] | None = None,
) -> Path:
    fig = new_figure()
    ax = fig.add_subplot()
    plot_ours(ax, runs[runs[task].notna()], task)
    plot_references(ax, runs[runs[task].notna()], task, chance)
    published = paper[(paper["model"] == model) & (paper["task"] == task)]
    plot_paper(ax, published[published["quantizer"] == "none"])
    xlabel = "compression ratio (fraction of layers removed; of weights for sparsegpt)"
    ax.set(xlabel=xlabel, ylabel=f"{task} acc (%)", title=f"{model}: {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, out / "plots" / f"curve_{model}_{task}.png")


def method_color(method: str) -> str:
    """One colour per method, shared by our line and the paper's points."""
    order = list(METHOD_ORDER)
    return f"C{order.index(method) if method in order else len(order)}"


def plot_ours(ax: Axes, runs: pd.DataFrame, task: str) -> None:
    """A solid line per method and variant (variants differ by marker)."""
    markers = "osD^v<>"
    for method, lines in runs.groupby("method", sort=False):  # `runs` is in METHOD_ORDER
        for i, (variant, line) in enumerate(lines.groupby("variant", sort=False)):
            line = line.sort_values("compression_ratio")
            label = f"{method} ({variant})" if variant else method
            style = {"color": method_color(str(method)), "marker": markers[i % len(markers)]}
            low, high = line.get(f"{task}_low"), line.get(f"{task}_high")
            if low is not None and low.notna().any():
                yerr = np.vstack([line[task] - low, high - line[task]])
                ax.errorbar(line["compression_ratio"], line[task], yerr=yerr, fmt="-",
                            capsize=3, label=label, **style)  # fmt: skip
            else:
                ax.plot(line["compression_ratio"], line[task], "-", label=label, **style)


def plot_references(
    ax: Axes, runs: pd.DataFrame, task: str, chance: tuple[float, str] | None
) -> None:
    """The dense model's accuracy and the task's chance level as horizontal lines."""
    dense = runs[(runs["method"] == "none") & (runs["compression_ratio"] == 0)]
    if len(dense):
        value = float(dense[task].iloc[0])
        ax.axhline(value, color="grey", linestyle=":", label=f"dense ({value:.1f})")
    if chance is not None:
        level, how = chance
        ax.axhline(100 * level, color="black", linestyle="--", linewidth=0.8, alpha=0.6,
                   label=f"chance ({how}, {100 * level:.1f})")  # fmt: skip


def plot_paper(ax: Axes, published: pd.DataFrame) -> None:
    """The published points as faint dashed lines, coloured like our method's line."""
    published = published.drop_duplicates(["method", "compression_ratio"])  # Tables 1-3 overlap
    for method, points in published.groupby("method"):
        points = points.sort_values("compression_ratio")
        style = {"color": method_color(str(method)), "alpha": 0.5, "label": f"{method} (paper)"}
        ax.plot(points["compression_ratio"], points["acc"], "x--", **style)


def heatmaps(root: Path, out: Path) -> list[Path]:
    """A heatmap for every similarity_*.npy under the outputs dir, named after its run dir."""
    paths = []
    for npy in sorted(root.rglob("similarity_*.npy")):
        if out.resolve() in npy.resolve().parents:
            continue
        run_dir = npy.parent.relative_to(root)
        name = "_".join((*run_dir.parts, npy.stem)).replace(" ", "_")
        title = f"{run_title(npy.parent)}{npy.stem.replace('_', ' ')}"
        try:
            paths.append(similarity_heatmap(np.load(npy), out / "heatmaps" / f"{name}.png", title))
        except (ValueError, OSError) as err:  # one bad file must not sink the report
            warnings.warn(f"skipping {npy}: {err}", RuntimeWarning, stacklevel=2)
    return paths


def run_title(run_dir: Path) -> str:
    """`model method ratio: ` from the run's results.json, or nothing."""
    try:
        record = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return ""
    ratio = record.get("layer_ratio")
    ratio_text = f" {ratio:.3g}" if isinstance(ratio, float | int) else ""
    return f"{record.get('model', '?')} {record.get('method', '?')}{ratio_text}: "


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------- output


TITLES = {
    "table1": "Table 1: compression + quantization → MMLU",
    "table2": "Table 2: methods × compression ratio → five tasks",
    "table3_4": "Tables 3-4: MMLU vs retained layers",
}


def write_tables(tables: dict[str, pd.DataFrame], out: Path) -> None:
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(f"## {TITLES[name]}\n\n{markdown(table)}")


def write_index(report: Report, source: Path, runs: int) -> Path:
    """report.md: every table inline (with its CSV) and every figure."""
    intro = f"{runs} runs from `{source}`. Accuracies in %; `*_paper` = published numbers "
    lines = [f"# MKA experiment report\n\n{intro}(arXiv 2406.16330) for the same point.\n"]
    if report.statistics:
        lines.append(f"## Intervals and paired tests\n\n{METHODS_TEXT}\n{report.statistics}")
    for name, table in report.tables.items():
        lines.append(f"## {TITLES[name]}\n\n[{name}.csv]({name}.csv)\n\n{markdown(table)}")
    for title, paths in (
        ("Accuracy vs compression", report.plots),
        ("Similarity", report.heatmaps),
    ):
        if paths:
            lines.append(f"## {title}\n")
            lines += [f"![{p.stem}]({p.relative_to(report.out).as_posix()})\n" for p in paths]
    path = report.out / "report.md"
    path.write_text("\n".join(lines))
    return path


def log_to_wandb(report: Report) -> None:
    """Tables and figures to one wandb run (offline unless WANDB_MODE says otherwise); a wandb
    failure only warns: the report on disk is already complete."""
    try:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        run = wandb.init(project="mka-exp", job_type="report", dir=str(report.out), mode=mode)
        for name, table in report.tables.items():
            run.log({name: wandb.Table(dataframe=table.astype(object).where(table.notna(), None))})
        for path in report.plots + report.heatmaps:
            run.log({f"{path.parent.name}/{path.stem}": wandb.Image(str(path))})
        run.finish()
    except Exception as err:  # wandb may fail in many ways (network, service, disk)
        message = f"wandb logging failed ({err}); the report on disk is complete"
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def merged_outputs(sources: list[Path], into: Path) -> Path:
    """One outputs dir whose records/ links every record (and per-example file) of several
    outputs dirs, e.g. the evidence folders of several models in one comparison document. The
    same config hash in two sources is the same run: the first source's record is used."""
    for source in sources:
        if not (source / "records").is_dir():
            raise ReportError(
                f"{source}: several sources must each be an outputs dir with records/"
            )
    records = into / "records"
    if records.exists():
        shutil.rmtree(records)
    records.mkdir(parents=True)
    for source in sources:
        for path in sorted((source / "records").glob("*")):
            link = records / path.name
            if path.is_file() and not link.exists():
                link.symlink_to(path.resolve())
    return into


def build_report(
    source: Path | list[Path],
    out: Path | None = None,
    baseline: str | None = None,
    resamples: int = stats.N_RESAMPLES,
) -> Report:
    """Read the runs, write every table and figure; returns what was written. Several sources
    (outputs dirs) are read as one, through links under `out`/sources, which must then be given."""
    if isinstance(source, list):
        if len(source) > 1 and out is None:
            raise ReportError("several sources need --out DIR (where the report goes)")
        source = merged_outputs(source, out / "sources") if len(source) > 1 else source[0]
    table, root = load_table(source)
    report = Report(out=out or root / "report")
    report.out.mkdir(parents=True, exist_ok=True)
    df, paper = prepare(table), load_paper()
    if source.is_dir():
        report.stats = compute_stats(df, root, baseline, resamples)
        report.statistics = stats_markdown(report.stats, load_records(root))
        write_stats(report.stats, report.statistics, report.out)
    elif baseline:
        raise ReportError(f"--baseline {baseline}: paired tests need an outputs dir, not {source}")
    df = with_intervals(df, report.stats)
    report.tables = {"table1": table1(df, paper), "table2": table2(df, paper)}
    report.tables["table3_4"] = table3_4(df, paper)
    write_tables(report.tables, report.out)
    chance = report.stats.chance if report.stats else None
    report.plots = curve_plots(df, paper, report.out, chance)
    report.heatmaps = heatmaps(root, report.out)
    write_index(report, source, len(df))
    return report


def write_stats(st: Stats, text: str, out: Path) -> None:
    st.accuracy.to_csv(out / "accuracy_intervals.csv", index=False)
    st.differences.to_csv(out / "paired_differences.csv", index=False)
    st.sensitivity.to_csv(out / "calibration_sensitivity.csv", index=False)
    st.one_answer.to_csv(out / "one_answer.csv", index=False)
    (out / "statistics.md").write_text(f"# Intervals and paired tests\n\n{METHODS_TEXT}\n{text}")


METHODS_TEXT = f"""Accuracies in %, each with a 95 % interval: Wilson score for one task, a bootstrap over
subjects and their questions for MMLU's macro average ({stats.N_RESAMPLES:,} resamples, seed
{stats.SEED}). Each compressed run is compared with a baseline on the same examples: the paired
difference in points with a paired bootstrap 95 % interval (by subject and question for MMLU) and
McNemar's exact p on the discordant examples (all examples pooled); `{MARK}` marks a difference
whose interval excludes 0. The default baseline of a column is the most accurate run of a pruning
method ({", ".join(PRUNING_METHODS)}) with the same model and layer count (picked per column, so
it is a strong baseline: a method that beats it beats every pruning run there).
"""
GENERATED = "<!-- generated by `python -m mka_exp.report --markdown`: edit only below KEPT -->"
KEPT = "<!-- KEPT: everything below this line survives when the report regenerates the file -->"


def write_comparison_doc(path: Path, report: Report, sources: list[Path], command: str) -> Path:
    """The method comparison document: the generated header and statistics, then whatever the
    old file kept below the KEPT line (a hand-written file is kept whole, under a heading)."""
    if report.stats is None:
        raise ReportError(f"--markdown needs an outputs dir with records/, not {sources[0]}")
    records = {k: v for s in reversed(sources) for k, v in load_records(s).items()}
    header = comparison_header(report.stats, records, sources, command)
    text = f"{GENERATED}\n{header}\n{report.statistics}\n{KEPT}\n\n{kept_part(path)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.rstrip("\n").encode() + b"\n")
    return path


def kept_part(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    if KEPT in text:
        return text.split(KEPT, 1)[1].lstrip("\n")
    if text.startswith(GENERATED):
        return ""
    return "## Previous hand-written version (kept)\n\n" + text.replace("\n# ", "\n### ")


def comparison_header(
    st: Stats, records: dict[str, dict], sources: list[Path], command: str
) -> str:
    runs = [r for r in records.values() if r.get("config_hash") in set(st.accuracy["config_hash"])]
    models = sorted({f"{r.get('model')} ({r.get('layers_before')} layers)" for r in runs})
    protocols = sorted({eval_protocol(r.get("config") or {}) for r in runs})
    versions = sorted({str(r.get("code_version", "?")) for r in runs})
    chance = ", ".join(f"{t} {100 * v:.1f} ({how})" for t, (v, how) in st.chance.items())
    return "\n".join([
        "# Method comparison\n",
        f"Generated on {time.strftime('%Y-%m-%d')} from {len(runs)} run records with per-example "
        f"records in {', '.join(f'`{s}`' for s in sources)} by\n\n```bash\n{command}\n```\n",
        f"- Models: {', '.join(models) or 'none'}.",
        f"- Evaluation: {'; '.join(protocols) or 'none'} (examples per task under each model).",
        f"- Code versions: {', '.join(versions)}.",
        f"- Baseline: {st.baseline}. Chance levels drawn in the plots: {chance}.\n",
        METHODS_TEXT,
    ])  # fmt: skip


def eval_protocol(config: dict) -> str:
    ev = config.get("eval") or {}
    tasks = set(ev.get("tasks") or [])
    shots = {t: n for t, n in (ev.get("num_fewshot") or {}).items() if t in tasks}
    shot_text = ", ".join(f"{t} {n}-shot" for t, n in sorted(shots.items())) or "all 0-shot"
    return f"tasks {', '.join(ev.get('tasks') or [])}, limit {ev.get('limit')}, {shot_text}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m mka_exp.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "source",
        type=Path,
        nargs="+",
        help="an outputs dir (with records/) or a results.csv; or several outputs dirs, read as one",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: <outputs dir>/report (one source)"
    )
    parser.add_argument("--wandb", action="store_true", help="also log tables and plots to wandb")
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="METHOD",
        help="compare every run with this method at the same layer count "
        f"(default: the best of {', '.join(PRUNING_METHODS)} there)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the method comparison document (e.g. docs/method_comparison.md)",
    )
    parser.add_argument("--resamples", type=int, default=stats.N_RESAMPLES, help="bootstrap size")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.source, args.out, args.baseline, args.resamples)
        if args.markdown:
            command = shlex.join(["python", "-m", "mka_exp.report", *argv])
            write_comparison_doc(args.markdown, report, args.source, command)
    except (ReportError, samples_mod.SamplesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, table in report.tables.items():
        print(f"## {TITLES[name]}\n\n{markdown(table)}")
    if report.statistics:
        print(f"## Intervals and paired tests\n{report.statistics}")
    if args.wandb:
        log_to_wandb(report)
    print(f"report written to {report.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
