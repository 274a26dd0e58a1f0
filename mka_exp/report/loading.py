"""Loading runs: the run table (rebuilt from records), each record's config as columns, the
derived columns every table uses (ratio, variant label, accuracy in %), and per-example rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mka_exp.methods import registry
from mka_exp.results import records as results
from mka_exp.results import samples as samples_mod
from mka_exp.results.records import NON_RESULT_KEYS
from mka_exp.results.table import rebuild_table

PAPER_TASKS = {
    "mmlu": "mmlu",
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "race": "race_h",
    "boolq": "boolq",
}
TASKS = tuple(PAPER_TASKS)
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


# ---------------------------------------------------------------- input


def load_table(path: Path) -> tuple[pd.DataFrame, Path]:
    """The run table and the outputs dir it belongs to (where similarity .npy files are sought)."""
    if not path.exists():
        raise ReportError(f"{path}: no such file or directory")
    if path.is_dir():
        table = rebuild_table(path, damaged=[])  # read-only: a damaged record stays in place
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
    for record in load_records(outputs).values():
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
    df["_order"] = df["method"].map(registry.order)
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
    keys = [CALIB_SOURCE] * (CALIB_SOURCE in df) + keys  # which calibration source comes first
    labels = pd.Series("", index=df.index)
    for (_, method, _), group in df.groupby(["model", "method", "quantizer"]):
        # Keys only some runs have (a repair's options) tell runs apart only by their values.
        differing = [k for k in keys if group[k].dropna().astype(str).nunique() > 1
                     and labels_variant(k, str(method))]  # fmt: skip
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
    if isinstance(value, str) and value.startswith("mka_exp.calibration."):
        return value.rsplit(".", 1)[-1]  # the builder, as `calib=` takes it
    return "+".join(map(str, value)) if isinstance(value, list | tuple) else cell(value)


def notna(value: object) -> bool:
    return not (isinstance(value, float) and np.isnan(value)) and value is not None


def labels_variant(column_name: str, method: str) -> bool:
    """A method option labels a variant only if the registry lists it (a cache path, a batch size
    or a sampler's seed never does); other keys (repair, calibration) always may."""
    if not column_name.startswith("config.method."):
        return True
    entry = registry.METHODS.get(method)
    return entry is None or column_name.split(".")[2] in entry.variant_keys


def is_variant_key(key: str) -> bool:
    return not key.startswith(NOT_VARIANT) and key.rsplit(".", 1)[-1] not in NOT_VARIANT_LEAVES


# config key -> variant label
SHORT_KEYS = {"repair.name": "repair", "eval.tasks": "tasks", "calib._target_": "calib"}
CALIB_SOURCE = "config.calib._target_"  # a `_target_`, yet it names what a run calibrated on


def short_key(column_name: str) -> str:
    key = column_name[len("config.") :]
    if key in SHORT_KEYS:
        return SHORT_KEYS[key]
    return key[len("method.") :] if key.startswith("method.") else key


def load_records(root: Path) -> dict[str, dict]:
    """The records that read whole, by config hash; the report never moves a damaged one."""
    records = results.load_records(root, results.record_keys(root), damaged=[])
    return {r["config_hash"]: r for r in records}


def damaged_records(root: Path) -> list[str]:
    """`<path>: <what is wrong>` for each record that does not read, and each one an earlier
    run moved aside (`*.json.damaged`); all left where they are."""
    damaged: list[str] = []
    results.load_records(root, results.record_keys(root), damaged)
    aside = sorted((Path(root) / "records").glob("*.json.damaged"))
    return damaged + [f"{path}: moved aside by an earlier run" for path in aside]


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


def column_order(name: str) -> tuple:
    """Our five tasks in the paper's order first, then others; acc before acc_norm."""
    task, _, metric = name.partition(" ")
    rank = TASKS.index(task) if task in TASKS else len(TASKS)
    return (rank, task, metric)


def cell(value: object, digits: int | None = None) -> str:
    """Blank for missing; accuracies with fixed decimals like the paper; else shortest form."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if digits is not None and isinstance(value, int | float):
        return f"{value:.{digits}f}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


GROUP = ["model", "quantizer", "layers_after", "column"]  # one baseline per column and cut


def align(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """A's and B's outcomes side by side, example by example; or why they cannot be paired."""
    key = ["subtask", "doc_id"]
    both = same_examples(a, b, key)
    if both is None:  # some example evaluated by one run only: say how many
        both = a.merge(b, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
        only = int((both["_merge"] != "both").sum())
        return both, f"{only} of {len(both)} examples evaluated by only one"
    if (both["doc_hash_a"] != both["doc_hash_b"]).any():
        return both, "same ids, different documents"
    if (both["prompt_hash_a"] != both["prompt_hash_b"]).any():
        return both, "same documents, different prompts (few-shot settings?)"
    return both, ""


def same_examples(a: pd.DataFrame, b: pd.DataFrame, key: list[str]) -> pd.DataFrame | None:
    """A's and B's rows side by side when both hold exactly the same keys (the usual case: a
    merge costs ~50x more, and the report pairs a thousand times); None otherwise."""
    a, b = a.sort_values(key, kind="stable"), b.sort_values(key, kind="stable")
    if len(a) != len(b) or a[key].duplicated().any():
        return None
    if not all(np.array_equal(a[k].to_numpy(), b[k].to_numpy()) for k in key):
        return None
    parts = [a[key], a.drop(columns=key).add_suffix("_a"), b.drop(columns=key).add_suffix("_b")]
    return pd.concat([part.reset_index(drop=True) for part in parts], axis=1)
