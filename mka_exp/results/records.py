"""Run records: one JSON per finished run, written atomically, keyed by the config hash, and one
aggregated table derived from them that concurrent jobs update under a file lock.

Layout under `records_dir`::

    records/<config_hash>.json     the record (the source of truth; resume looks here)
    records/<hash>.json.damaged    a record that did not parse, moved aside (its point reruns)
    failures/<config_hash>.json    a point that failed: its error line and config (resume retries it)
    claims/<config_hash>.json      a point being computed: host, pid, heartbeat (`claims.py`)
    results.csv                    every record flattened to one row (derived: rebuilt from records/)

A crash can leave neither a half-written record nor a half-written table: every write goes to a
temporary file first and is moved into place with `os.replace`. Files are created with the
process umask (0644 under the usual 022), so a group sharing an output root can read them.

Records are the truth. The table is checked on every update (whole rows, the header's field count
on every row, unique string hashes) and rebuilt from `records/` with one warning when it is not a
whole table (cut mid-row, emptied, random bytes); its rows follow the records on disk. The table
is CSV (what users open first) behind `flock` + atomic replace, which works on NFS/Lustre where
SQLite locking does not; read it with `read_table` (hashes stay strings: `724e8363...` would
otherwise parse as a float).

The config hash leaves out every absolute path (`paths.*`, `data_root`, a local calibration
file's location): the same experiment on the same data matches across machines and users. The
data goes in as a fingerprint instead: the relative name and size of every `*.jsonl` in the
mirror (`data_fingerprint`; one `stat` per file, no reads; "hub" without a mirror), and a local
calibration file's name and content hash. A mirror with other files or sizes is other data, so its
points are computed again.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

# Config keys (dotted) that never change a run's results: where files go, how it is logged, where
# caches live, whether evaluation shares multiple-choice contexts (same scores, less work), and
# where the data mirror sits (its content enters the hash as `data_fingerprint`), and a model file's
# pins (a file that fails them is refused, so they never change a result).
NON_RESULT_KEYS = (
    "paths",
    "logger",
    "hydra",
    "resume",
    "method.cache",
    "eval.share_prefix",
    "eval.prefix_cache_tokens",
    "eval.prefix_min_shared",
    "data_root",
    "model.pins",
    "calib.data_root",
    "eval.data_root",
    "compare",  # which comparisons the report marks (conf/compare/): read after the run
)
TABLE = "results.csv"
# Table columns read as text whatever they look like (an all-digit hash or git commit).
STRING_COLUMNS = ("config_hash", "code_version", "model", "method", "quantizer")
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".txt")
# conf/eval's default backend: records written before eval had a `_target_` name none, so the
# hash leaves it out (any other backend's name is hashed: another engine, another result).
DEFAULT_EVAL_BACKEND = "mka_exp.evaluation.hf.HFEvaluation"


def without_keys(config: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    top = {key.split(".", 1)[0] for key in dotted if "." not in key}
    kept = {k: v for k, v in config.items() if k not in top}
    for key in dotted:
        head, _, rest = key.partition(".")
        if rest and isinstance(kept.get(head), dict):
            kept[head] = without_keys(kept[head], (rest,))
    return kept


def data_fingerprint(data_root: str | None) -> str:
    """Names (relative to the mirror) and sizes of the mirror's `*.jsonl` files, hashed; "hub"
    without a mirror. The same mirror at another path gives the same fingerprint. Linked dataset
    folders are followed (two mirrors linking to different data differ); the files covered are
    logged once per mirror (`data_files`)."""
    if data_root is None:
        return "hub"
    root = Path(data_root).expanduser()
    if not root.is_dir():
        return "missing"  # the run itself stops with a clear error before any record
    files = data_files(root)
    listing = "\n".join(f"{f.relative_to(root).as_posix()}:{f.stat().st_size}" for f in files)
    fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:16]
    say_covered(str(root), fingerprint, tuple(f.relative_to(root).as_posix() for f in files))
    return fingerprint


def data_files(root: Path) -> list[Path]:
    """Every `*.jsonl` under `root`, through linked folders (a link back to a folder above it
    is not followed again), in `sorted(root.rglob(...))` order: a mirror of real folders keeps the
    fingerprint it had when links were not followed."""
    found, above = [], {str(root): {os.path.realpath(root)}}
    for folder, dirs, names in os.walk(root, followlinks=True):
        chain = above.pop(folder)
        for name in list(dirs):
            real = os.path.realpath(os.path.join(folder, name))
            if real in chain:  # a cycle
                dirs.remove(name)
            else:
                above[os.path.join(folder, name)] = chain | {real}
        found += [Path(folder) / n for n in names if n.endswith(".jsonl")]
    return sorted(found)


@functools.lru_cache(maxsize=64)
def say_covered(root: str, fingerprint: str, files: tuple[str, ...]) -> None:
    """Which files a mirror's fingerprint stands for, once per mirror and content."""
    datasets = sorted({f.rsplit("/", 2)[0] for f in files if f.count("/") >= 2})
    if not files:
        log.warning("data_root=%s holds no *.jsonl file: its fingerprint covers nothing", root)
        return
    log.info("data_root=%s: fingerprint %s covers %d *.jsonl files of %d datasets: %s", root,
             fingerprint, len(files), len(datasets), ", ".join(datasets))  # fmt: skip


def file_fingerprint(path: str) -> str:
    """A local data file by name and content (its folder is not part of the experiment)."""
    local = Path(path).expanduser()
    digest = hashlib.sha256(local.read_bytes()).hexdigest()[:16]
    return f"file:{local.name}:{digest}"


def hashed_view(config: dict[str, Any]) -> dict[str, Any]:
    """What the config hash covers: the config without paths, plus fingerprints of the data."""
    kept = without_keys(config, NON_RESULT_KEYS)
    kept["data_fingerprint"] = data_fingerprint(config.get("data_root"))
    calib = kept.get("calib")
    path = calib.get("path") if isinstance(calib, dict) else None
    local = isinstance(path, str) and Path(path).suffix in LOCAL_DATA_SUFFIXES
    if local and Path(path).expanduser().is_file():
        kept["calib"] = {**calib, "path": file_fingerprint(path)}
    if isinstance(calib, dict) and calib.get("seed", 0) is None:  # null: the draw before the key
        kept["calib"] = {k: v for k, v in kept["calib"].items() if k != "seed"}
    ev = kept.get("eval")
    if isinstance(ev, dict) and ev.get("sample_seed", 0) is None:  # null: the first N, as before
        kept["eval"] = ev = {k: v for k, v in ev.items() if k != "sample_seed"}
    if isinstance(ev, dict) and ev.get("_target_") == DEFAULT_EVAL_BACKEND:  # records before
        kept["eval"] = {k: v for k, v in ev.items() if k != "_target_"}  # the key have none
    return kept


def config_hash(config: dict[str, Any]) -> str:
    """Hash of the resolved config minus the keys that cannot change the results (paths), with
    the data's fingerprint in their place; 16 hex digits, always handled as a string."""
    blob = json.dumps(hashed_view(config), sort_keys=True, default=str)
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


FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or this user's quota on it


class DiskFull(OSError):
    """A write found the disk (or the quota) full; the message names the path and free space."""

    def __str__(self) -> str:
        return str(self.strerror)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def free_space(path: Path) -> str:
    """Free bytes on the file system holding `path` (its first existing folder), for a message."""
    path = Path(path).absolute()
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
    try:
        return f"{human_bytes(shutil.disk_usage(folder).free)} free on {folder}"
    except OSError:
        return f"free space of {folder} unknown"


@contextlib.contextmanager
def naming_full_disk(path: Path) -> Iterator[None]:
    """A full disk while writing `path` becomes `DiskFull` naming the path and the free space
    (`OSError: [Errno 28]` often names no file at all)."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno not in FULL:
            raise
        problem = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
        where = err.filename or path  # the file the system call named, else the one being written
        raise DiskFull(err.errno, f"{problem} writing {where} ({free_space(where)})") from None


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[str]:
    """A temporary path beside `path`, moved onto it only if the block succeeds.

    The file is created with mode 0666 minus the umask (not mkstemp's 0600), so the result has
    the permissions any other file of this process would have."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with naming_full_disk(path):
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            yield str(tmp)
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


def failure_path(records_dir: Path, key: str) -> Path:
    return Path(records_dir) / "failures" / f"{key}.json"


def move_aside(path: Path, reason: str, what: str = "record") -> None:
    """Keep a damaged file for inspection under `<name>.damaged`, out of every glob of `*.json`."""
    aside = path.with_name(path.name + ".damaged")
    with contextlib.suppress(FileNotFoundError):  # another job moved it first
        os.replace(path, aside)
    log.warning("%s %s is damaged (%s); moved to %s, its point is computed again", what, path,
                reason, aside.name)  # fmt: skip


def read_json_dict(path: Path, key: str) -> dict:
    """The JSON object in `path` whose `config_hash` is `key`; ValueError saying what is wrong."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    if obj.get("config_hash") != key:
        raise ValueError(f"config_hash {obj.get('config_hash')!r} does not match its name")
    return obj


def load_record(records_dir: Path, key: str, damaged: list[str] | None = None) -> dict | None:
    """The finished record of this config hash, if one exists (resume). A record that does not
    parse, or whose hash or metrics are missing, is moved aside with a warning: None. A reader
    that must not write (the report) passes `damaged`: the record stays where it is and
    `<path>: <what is wrong>` is appended to that list."""
    path = record_path(records_dir, key)
    if not path.exists():
        return None
    try:
        record = read_json_dict(path, key)
        if not isinstance(record.get("metrics"), dict):
            raise ValueError("no metrics")
    except ValueError as err:
        if damaged is not None:
            damaged.append(f"{path}: {err}")
        else:
            move_aside(path, str(err))
        return None
    return record


def save_failure(records_dir: Path, key: str, error: str, config: dict[str, Any]) -> Path:
    """Mark a point that failed (never a record): the next resume retries it and says why."""
    path = failure_path(records_dir, key)
    marker = {"config_hash": key, "error": error, "config": config, "time": time.time()}
    write_json_atomic(path, marker)
    return path


def load_failure(records_dir: Path, key: str) -> dict | None:
    """The failure marker of this point, if any; a damaged one is deleted with a warning."""
    path = failure_path(records_dir, key)
    if not path.exists():
        return None
    try:
        return read_json_dict(path, key)
    except ValueError as err:
        log.warning("failure marker %s is damaged (%s); deleted", path, err)
        path.unlink(missing_ok=True)
        return None


def clear_failure(records_dir: Path, key: str) -> None:
    failure_path(records_dir, key).unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process writing the same table."""
    lock = path.with_suffix(path.suffix + ".lock")
    with naming_full_disk(lock):
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "w")  # noqa: SIM115 (closed below, after the lock is released)
    with fh:
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


def write_bytes_atomic(path: Path, blob: bytes) -> None:
    with atomic_target(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())


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


def record_keys(records_dir: Path) -> list[str]:
    return sorted(p.stem for p in (Path(records_dir) / "records").glob("*.json"))


def load_records(
    records_dir: Path, keys: Iterable[str], damaged: list[str] | None = None
) -> list[dict]:
    """The records of these hashes that load (damaged ones are moved aside, or with `damaged`
    named there and left in place)."""
    return [r for r in (load_record(records_dir, k, damaged) for k in keys) if r is not None]


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
