"""Run records: one JSON per finished run, written atomically, keyed by the config hash, and one
aggregated table that concurrent jobs update under a file lock.

Layout under `records_dir`::

    records/<config_hash>.json     the record (the source of truth; resume looks here)
    results.csv                    every record flattened to one row (rebuildable from records/)

A crash can leave neither a half-written record nor a half-written table: every write goes to a
temporary file first and is moved into place with `os.replace`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

# Config keys (dotted) that never change a run's results: where files go, how it is logged, where
# caches live, and whether evaluation shares multiple-choice contexts (same scores, less work).
NON_RESULT_KEYS = ("paths", "logger", "hydra", "resume", "method.cache", "eval.share_prefix")


def without_keys(config: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    top = {key.split(".", 1)[0] for key in dotted if "." not in key}
    kept = {k: v for k, v in config.items() if k not in top}
    for key in dotted:
        head, _, rest = key.partition(".")
        if rest and isinstance(kept.get(head), dict):
            kept[head] = without_keys(kept[head], (rest,))
    return kept


def config_hash(config: dict[str, Any]) -> str:
    """Hash of the resolved config minus the keys that cannot change the results."""
    blob = json.dumps(without_keys(config, NON_RESULT_KEYS), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_version() -> str:
    """The git commit of the package checkout (with `-dirty`), or `unknown` outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return rev.stdout.strip() or "unknown"


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[str]:
    """A temporary path beside `path`, moved onto it only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_target(Path(path)) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())


def record_path(records_dir: Path, key: str) -> Path:
    return Path(records_dir) / "records" / f"{key}.json"


def load_record(records_dir: Path, key: str) -> dict | None:
    """The finished record of this config hash, if one exists (resume)."""
    path = record_path(records_dir, key)
    return json.loads(path.read_text()) if path.exists() else None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process writing the same table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def flatten_record(record: dict[str, Any]) -> dict[str, Any]:
    """One table row: scalars kept, `metrics`/`timings` spread into their own columns."""
    row = {k: v for k, v in record.items() if not isinstance(v, dict | list)}
    for group in ("metrics", "timings", "method_stats", "quant_stats"):
        for key, value in record.get(group, {}).items():
            if not isinstance(value, dict | list):
                row[f"{group}.{key}"] = value
    return row


def save_record(records_dir: Path, record: dict[str, Any], table_name: str = "results.csv") -> Path:
    """Write the record, then upsert its row into the table; returns the record's path."""
    path = record_path(records_dir, record["config_hash"])
    write_json_atomic(path, record)
    upsert_row(records_dir, record, table_name)
    return path


def upsert_row(
    records_dir: Path, record: dict[str, Any], table_name: str = "results.csv", replace: bool = True
) -> None:
    """Put the record's row into the table under the lock. With `replace=False` an existing row
    is left alone (resume: a job killed between record and table write still gets its row)."""
    table = Path(records_dir) / table_name
    with locked(table):
        rows = pd.read_csv(table) if table.exists() else pd.DataFrame()
        present = "config_hash" in rows and (rows["config_hash"] == record["config_hash"]).any()
        if present and not replace:
            return
        if present:
            rows = rows[rows["config_hash"] != record["config_hash"]]
        rows = pd.concat([rows, pd.DataFrame([flatten_record(record)])], ignore_index=True)
        with atomic_target(table) as tmp:
            rows.to_csv(tmp, index=False)


def rebuild_table(records_dir: Path) -> pd.DataFrame:
    """The table recomputed from every record on disk (what `results.csv` must equal)."""
    files = sorted((Path(records_dir) / "records").glob("*.json"))
    return pd.DataFrame([flatten_record(json.loads(f.read_text())) for f in files])
