"""Run records: one JSON per finished run, written atomically, keyed by the config hash.

Layout under `records_dir`::

    records/<config_hash>.json     the record (the source of truth; resume looks here)
    records/<hash>.json.damaged    a record that did not parse, moved aside (its point reruns)
    failures/<config_hash>.json    a point that failed: its error line and config (resume retries it)
    claims/<config_hash>.json      a point being computed: host, pid, heartbeat (`claims.py`)
    results.csv                    every record flattened to one row (derived: `table.py`)

The config hash leaves out every absolute path (`paths.*`, `data_root`, a local calibration
file's location): the same experiment on the same data matches across machines and users. The
data goes in as a fingerprint instead: the relative name and size of every `*.jsonl` in the
mirror (`data_fingerprint`; one `stat` per file, no reads; "hub" without a mirror), and a local
calibration file's name and content hash. A mirror with other files or sizes is other data, so its
points are computed again.

May import: `results.files`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mka_exp.results.files import write_json_atomic

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
    "method.similarity_after",  # a heatmap's capture pass; same merges (test_methods.py)
    "eval.share_prefix",
    "eval.prefix_cache_tokens",
    "eval.prefix_min_shared",
    "eval.reuse",  # same scores with or without (tests/test_reuse.py); where the store is
    "eval.reuse_layers",
    "eval.reuse_bytes",
    "eval.answer_cache",  # where answers are kept as they come; same scores (test_answers.py)
    "repair.reuse",  # dense states kept for later fits: same fits (test_repair_dense_states.py)
    "repair.reuse_layers",
    "repair.reuse_bytes",
    "data_root",
    "model.pins",
    "model.reseal",  # accepts a local model folder's new files: refuses nothing, computes nothing
    "calib.data_root",
    "eval.data_root",
    "compare",  # which comparisons the report marks (conf/compare/): read after the run
)


# Keys added after records existed whose null means what runs did before them: left out of the
# hash when null, so those records keep their keys.
NULL_IS_ABSENT = (
    "calib.seed",  # null: the draw before the key
    "eval.sample_seed",  # null: the first N examples, as before
    "method.search_tokens",  # SLEB, null: the search reads the whole calibration set
)

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


def comparable_view(config: dict[str, Any]) -> dict[str, Any]:
    """The config as two runs of one experiment share it: without paths and the other keys that
    cannot change a result, and without keys whose default means "as before the key existed"
    (`NULL_IS_ABSENT` when null, the default evaluation backend's `_target_`)."""
    kept = without_keys(config, NON_RESULT_KEYS)
    for dotted in NULL_IS_ABSENT:
        group, key = dotted.split(".")
        section = kept.get(group)
        if isinstance(section, dict) and key in section and section[key] is None:
            kept[group] = {k: v for k, v in section.items() if k != key}
    ev = kept.get("eval")
    if isinstance(ev, dict) and ev.get("_target_") == DEFAULT_EVAL_BACKEND:  # records before
        kept["eval"] = {k: v for k, v in ev.items() if k != "_target_"}  # the key have none
    return kept


def hashed_view(config: dict[str, Any]) -> dict[str, Any]:
    """What the config hash covers: `comparable_view`, plus fingerprints of the data."""
    kept = comparable_view(config)
    kept["data_fingerprint"] = data_fingerprint(config.get("data_root"))
    calib = kept.get("calib")
    path = calib.get("path") if isinstance(calib, dict) else None
    local = isinstance(path, str) and Path(path).suffix in LOCAL_DATA_SUFFIXES
    if local and Path(path).expanduser().is_file():
        kept["calib"] = {**calib, "path": file_fingerprint(path)}
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


def record_keys(records_dir: Path) -> list[str]:
    return sorted(p.stem for p in (Path(records_dir) / "records").glob("*.json"))


def load_records(
    records_dir: Path, keys: Iterable[str], damaged: list[str] | None = None
) -> list[dict]:
    """The records of these hashes that load (damaged ones are moved aside, or with `damaged`
    named there and left in place)."""
    return [r for r in (load_record(records_dir, k, damaged) for k in keys) if r is not None]
