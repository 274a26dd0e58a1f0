"""What else the records say about a run: runs that give one answer to (nearly) every example of a
task, and how much the layer choice and accuracy move with the calibration seed."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pandas as pd

from mka_exp.report.loading import column_order
from mka_exp.results.records import config_hash, without_keys

CALIB_SEED = "calib.seed"
ID_COLUMNS = ["config_hash", "model", "quantizer", "method", "variant", "layers_before"]
ID_COLUMNS += ["layers_after", "removed"]


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
