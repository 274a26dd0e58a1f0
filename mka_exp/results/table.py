"""The results table (`results.csv`): every record flattened to one row, derived from `records/`
and updated by concurrent jobs under the table's lock (`writing`), which also serialises the
records, their copies, the per-example files and the claims.

Records are the truth. The table is checked on every update (whole rows, the header's field count
on every row, unique string hashes) and rebuilt from `records/` with one warning when it is not a
whole table (cut mid-row, emptied, random bytes); its rows follow the records on disk. The table
is CSV (what users open first) behind `flock` + atomic replace; read it with `read_table` (hashes
stay strings: `724e8363...` would otherwise parse as a float).

May import: `results.files`, `results.records`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mka_exp.results.files import atomic_target, locked, write_json_atomic
from mka_exp.results.records import load_records, record_keys, record_path

log = logging.getLogger(__name__)


TABLE = "results.csv"


# Table columns read as text whatever they look like (an all-digit hash or git commit).
STRING_COLUMNS = ("config_hash", "code_version", "model", "method", "quantizer")


def flatten_record(record: dict[str, Any]) -> dict[str, Any]:
    """One table row: scalars kept, `metrics`/`timings` spread into their own columns."""
    row = {k: v for k, v in record.items() if not isinstance(v, dict | list)}
    for group in ("metrics", "timings", "method_stats", "quant_stats"):
        for key, value in record.get(group, {}).items():
            if not isinstance(value, dict | list):
                row[f"{group}.{key}"] = value
    return row


def save_record(
    records_dir: Path, record: dict[str, Any], table_name: str = TABLE, copy: Path | None = None
) -> Path:
    """Write the record (and its `copy`, e.g. the run directory's results.json), then upsert its
    row into the table, all under the table's lock; returns the record's path."""
    path = record_path(records_dir, record["config_hash"])
    with writing(records_dir, table_name, copy) as table:
        if copy is not None:
            write_json_atomic(copy, record)
        write_json_atomic(path, record)
        upsert_locked(table, records_dir, [record], replace=True)
    return path


def save_copy(records_dir: Path, copy: Path, record: dict[str, Any]) -> None:
    """A finished record's copy in its run directory (resume), under the table's lock."""
    with writing(records_dir, copy=copy):
        write_json_atomic(copy, record)


@contextlib.contextmanager
def writing(records_dir: Path, table_name: str = TABLE, copy: Path | None = None) -> Iterator[Path]:
    """The table's lock, held by every writer of the table, of `records/` (records and their
    per-example files) and of the records' copies while its temp exists. So a temp seen on
    taking the lock is one that a writer killed inside `atomic_target` left (kill -9 runs no
    cleanup): it is removed."""
    table = Path(records_dir) / table_name
    with locked(table):
        stale = [*table.parent.glob(f".{table.name}.*.tmp"), *table.parent.glob("records/.*.tmp")]
        if copy is not None:
            stale += Path(copy).parent.glob(f".{Path(copy).name}.*.tmp")
        for path in stale:
            path.unlink(missing_ok=True)
        yield table


class DamagedTable(ValueError):
    """The table file is not a whole table; the message says what is wrong with it."""


def read_table(path: Path) -> pd.DataFrame:
    """The results table with explicit dtypes (hashes and commits are strings).

    Raises DamagedTable when the file is not whole: not UTF-8 text, empty, cut mid-row (no final
    newline, or a row with fewer fields than the header), without `config_hash`, or with a
    missing or repeated hash."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedTable("not UTF-8 text") from None
    if not text.strip():
        raise DamagedTable("empty")
    if not text.endswith("\n"):
        raise DamagedTable("cut mid-row (no final newline)")
    try:
        lines = list(csv.reader(io.StringIO(text)))
    except csv.Error as err:
        raise DamagedTable(f"not CSV ({err})") from None
    header = lines[0]
    if "config_hash" not in header:
        raise DamagedTable("no config_hash column")
    for number, fields in enumerate(lines[1:], start=2):
        if len(fields) != len(header):
            raise DamagedTable(f"line {number} has {len(fields)} fields, the header {len(header)}")
    dtypes = {c: str for c in STRING_COLUMNS if c in header}
    table = pd.read_csv(io.StringIO(text), dtype=dtypes, keep_default_na=False, na_values=[""])
    hashes = table["config_hash"]
    if hashes.isna().any() or not hashes.is_unique:
        raise DamagedTable("missing or repeated config_hash")
    return table


def rows_of(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([flatten_record(r) for r in records])


def current_rows(table: Path, records_dir: Path) -> pd.DataFrame:
    """The table's rows, checked against the records: rows of records not in the table are added,
    rows without a record dropped; a damaged table is rebuilt from the records (one warning)."""
    keys = record_keys(records_dir)
    if not table.exists():
        return rows_of(load_records(records_dir, keys))
    try:
        rows = read_table(table)
    except DamagedTable as err:
        records = load_records(records_dir, keys)
        log.warning("table %s is damaged (%s); rebuilt from the %d record(s) in %s", table, err,
                    len(records), Path(records_dir) / "records")  # fmt: skip
        return rows_of(records)
    known = set(keys)
    rows = rows[rows["config_hash"].isin(known)]
    missing = [k for k in keys if k not in set(rows["config_hash"])]
    if missing:
        rows = pd.concat([rows, rows_of(load_records(records_dir, missing))], ignore_index=True)
    return rows


def upsert_row(
    records_dir: Path, record: dict[str, Any], table_name: str = TABLE, replace: bool = True
) -> None:
    """Put the record's row into the table under the lock. With `replace=False` an existing row
    is left alone (resume: a job killed between record and table write still gets its row)."""
    upsert_rows(records_dir, [record], table_name, replace)


def upsert_rows(
    records_dir: Path, records: list[dict[str, Any]], table_name: str = TABLE, replace: bool = True
) -> None:
    """`upsert_row` for several records in one locked read-check-write of the table."""
    with writing(records_dir, table_name) as table:
        upsert_locked(table, records_dir, records, replace)


def upsert_locked(table: Path, records_dir: Path, records: list[dict], replace: bool) -> None:
    """The read-check-write of `upsert_rows`; the caller holds the table's lock."""
    rows = current_rows(table, records_dir)
    for record in records:
        key = record["config_hash"]
        present = "config_hash" in rows and (rows["config_hash"] == key).any()
        if present and not replace:
            continue
        if present:
            rows = rows[rows["config_hash"] != key]
        rows = pd.concat([rows, rows_of([record])], ignore_index=True)
    if rows.columns.empty:  # no records at all: no table (an empty file reads as damaged)
        table.unlink(missing_ok=True)
        return
    with atomic_target(table) as tmp:
        rows.to_csv(tmp, index=False)


def rebuild_table(records_dir: Path, damaged: list[str] | None = None) -> pd.DataFrame:
    """The table recomputed from every record on disk (what `results.csv` must equal); with
    `damaged`, read-only (see `load_record`)."""
    return rows_of(load_records(records_dir, record_keys(records_dir), damaged))
