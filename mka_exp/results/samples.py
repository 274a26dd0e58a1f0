"""Per-example records: lm-eval's outcome for every evaluated example, kept beside the run record.

The rows and their columns are evaluation's (`mka_exp.evaluation.rows`); this module writes
and reads them.

The file is gzip'd JSON lines, `records/<config hash>.samples.jsonl.gz` under the records dir,
written atomically (temp file + `os.replace`, mode from the umask, gzip mtime 0 so equal content
gives an equal file), and the record holds `{"path": <relative to the records dir>, "sha256",
"rows", "examples_sha256"}`; `read_samples` checks the digest. `examples_sha256` names which
examples were evaluated (`examples_digest` of each subtask's doc_ids: with `eval.sample_seed` it
is the digest of the draw), so two records evaluated the same examples when it is equal.
`aggregate` recomputes the record's metrics from the rows: the mean per task, and for a group
(MMLU) lm-eval's size-weighted score (`acc`, the mean over all questions) and the macro average
over subjects (`acc_macro`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mka_exp.evaluation.rows import CHOICE_COLUMNS, COLUMNS, HASH_DIGITS, METRICS
from mka_exp.results.files import write_bytes_atomic
from mka_exp.results.table import writing

SUFFIX = ".samples.jsonl.gz"


def samples_path(records_dir: Path, key: str) -> Path:
    return Path(records_dir) / "records" / f"{key}{SUFFIX}"


def write_samples(records_dir: Path, key: str, frame: pd.DataFrame) -> dict[str, Any]:
    """Write the rows for config hash `key`; returns the reference the record keeps."""
    path = samples_path(records_dir, key)
    lines = (json.dumps(json_row(row), sort_keys=True) for row in frame.to_dict("records"))
    data = ("\n".join(lines) + "\n" if len(frame) else "").encode()
    blob = gzip.compress(data, mtime=0)
    with writing(records_dir):  # a kill mid-write leaves a temp the next writer clears
        write_bytes_atomic(path, blob)
    return {
        "path": path.relative_to(records_dir).as_posix(),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "rows": len(frame),
        "examples_sha256": examples_digest(frame.groupby("subtask")["doc_id"].agg(list).to_dict()),
    }


def examples_digest(doc_ids: Mapping[str, Iterable[int]]) -> str:
    """16 hex digits of sha256 over `{subtask: sorted distinct doc_ids}` as sorted JSON (for
    `evaluation.draw_examples`' output as for the rows of a file)."""
    plain_ids = {str(k): sorted({int(i) for i in v}) for k, v in doc_ids.items()}
    blob = json.dumps(plain_ids, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_DIGITS]


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (a metric the task lacks) as null; numpy scalars as Python ones."""
    out = {}
    for key, value in row.items():
        value = value.item() if isinstance(value, np.generic) else value
        out[key] = None if isinstance(value, float) and math.isnan(value) else value
    return out


class SamplesError(ValueError):
    """A record's per-example file is missing or does not match its digest."""


def read_samples(records_dir: Path, record: dict[str, Any]) -> pd.DataFrame | None:
    """The record's rows, None when the record has no per-example file (an older run)."""
    ref = record.get("samples")
    if not ref:
        return None
    path = Path(records_dir) / ref["path"]
    name = f"record {record.get('config_hash', '?')}: per-example file {path}"
    if not path.exists():
        raise SamplesError(f"{name} is missing")
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != ref.get("sha256"):
        raise SamplesError(f"{name} has sha256 {digest[:12]}…, the record says {ref.get('sha256')}")
    lines = gzip.decompress(blob).decode().splitlines()
    rows = [json.loads(line) for line in lines if line]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame[list(METRICS)] = frame[list(METRICS)].astype(float)
    for column in CHOICE_COLUMNS:  # lists per row; None in a file older than these columns
        frame[column] = pd.Series(
            [row.get(column) for row in rows], index=frame.index, dtype=object
        )
    return frame


def aggregate(frame: pd.DataFrame) -> dict[str, float]:
    """The record's metrics recomputed from the rows (`{"<task>/<metric>": value}`): each leaf's
    mean; for a task with several subtasks also the mean over all its examples (lm-eval's
    size-weighted group score) and `<metric>_macro`, the mean of the subtask means."""
    out: dict[str, float] = {}
    for (task, filt), rows in frame.groupby(["task", "filter"], sort=False):
        suffix = "" if filt == "none" else f",{filt}"
        for metric in METRICS:
            values = rows[["subtask", metric]].dropna()
            if values.empty:
                continue
            per_subtask = values.groupby("subtask")[metric].mean()
            for subtask, mean in per_subtask.items():
                out[f"{subtask}/{metric}{suffix}"] = float(mean)
            if len(per_subtask) > 1 or per_subtask.index[0] != task:
                out[f"{task}/{metric}{suffix}"] = float(values[metric].mean())
                out[f"{task}/{metric}_macro{suffix}"] = float(per_subtask.mean())
    return out
