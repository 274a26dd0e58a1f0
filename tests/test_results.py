"""Records and the aggregated table: hashing, atomic writes, concurrent writers."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import multiprocessing as mp
import os
import random
import stat

import pandas as pd
import pytest

from mka_exp.results import files as results_files
from mka_exp.results import records as results
from mka_exp.results import table as results_table


def make_record(key: str, acc: float) -> dict:
    return {
        "config_hash": key,
        "model": "m",
        "layers_after": 3,
        "metrics": {"piqa/acc": acc},
        "timings": {"evaluate": 1.0},
        "config": {"seed": 0},
    }


def test_config_hash_ignores_paths_and_logger():
    base = {
        "seed": 0,
        "method": {"ratio": 0.25, "cache": "a/cache"},
        "paths": {"output_dir": "a"},
        "logger": {"x": 1},
    }
    moved = {
        **base,
        "method": {"ratio": 0.25, "cache": "b/cache"},
        "paths": {"output_dir": "b"},
        "logger": {"x": 2},
    }
    assert results.config_hash(base) != results.config_hash({**base, "method": {"ratio": 0.5}})
    assert results.config_hash(base) == results.config_hash(moved)
    assert results.config_hash(base) != results.config_hash({**base, "seed": 1})


def test_save_record_upserts_one_row_per_config(tmp_path):
    results_table.save_record(tmp_path, make_record("a", 0.5))
    results_table.save_record(tmp_path, make_record("b", 0.6))
    results_table.save_record(tmp_path, make_record("a", 0.7))
    table = pd.read_csv(tmp_path / "results.csv").sort_values("config_hash")
    assert table["config_hash"].tolist() == ["a", "b"]
    assert table["metrics.piqa/acc"].tolist() == [0.7, 0.6]
    assert results.load_record(tmp_path, "a")["metrics"]["piqa/acc"] == 0.7
    assert results.load_record(tmp_path, "missing") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_next_write_clears_temps_of_a_writer_killed_mid_write(tmp_path):
    # kill -9 inside atomic_target leaves its temp: the table's and a record's (found by CI)
    results_table.save_record(tmp_path, make_record("a", 0.5))
    left = [
        tmp_path / ".results.csv.999.0badf00d.tmp",
        tmp_path / "records" / ".b.json.999.0badf00d.tmp",
    ]
    for path in left:
        path.write_text("cut mid-wr")
    copy = tmp_path / "run" / "results.json"
    copy.parent.mkdir()
    (copy.parent / ".results.json.999.0badf00d.tmp").write_text("{")
    results_table.save_record(tmp_path, make_record("b", 0.6), copy=copy)
    assert not list(tmp_path.rglob("*.tmp"))
    assert json.loads(copy.read_text())["config_hash"] == "b"
    assert sorted(results_table.read_table(tmp_path / "results.csv")["config_hash"]) == ["a", "b"]


def write_many(records_dir, worker: int, count: int) -> None:
    for i in range(count):
        results_table.save_record(records_dir, make_record(f"w{worker}-{i}", i / count))


def test_concurrent_writers_lose_no_row(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_many, args=(tmp_path, w, 15)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    table = pd.read_csv(tmp_path / "results.csv")
    assert sorted(table["config_hash"]) == sorted(f"w{w}-{i}" for w in range(2) for i in range(15))
    rebuilt = results_table.rebuild_table(tmp_path)
    assert sorted(rebuilt["config_hash"]) == sorted(table["config_hash"])


def test_write_json_atomic_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    results_files.write_json_atomic(path, {"a": 1})
    with contextlib.suppress(RuntimeError):
        results_files.write_json_atomic(path, {"bad": object.__new__(BrokenJson)})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


class BrokenJson:
    def __str__(self) -> str:
        raise RuntimeError("cannot serialise")


def test_missing_row_is_restored_without_touching_the_record(tmp_path):
    results_table.save_record(tmp_path, make_record("a", 0.5))
    results_files.write_json_atomic(results.record_path(tmp_path, "b"), make_record("b", 0.6))
    record_b = results.load_record(tmp_path, "b")
    results_table.upsert_row(tmp_path, record_b, replace=False)
    results_table.upsert_row(tmp_path, {**record_b, "model": "changed"}, replace=False)
    table = pd.read_csv(tmp_path / "results.csv").set_index("config_hash")
    assert sorted(table.index) == ["a", "b"] and table.loc["b", "model"] == "m"


def table_hashes(path) -> list[str]:
    """The table's config_hash column as the text in the file (no type guessing)."""
    with open(path, newline="") as fh:
        return [row["config_hash"] for row in csv.DictReader(fh)]


def test_numeric_looking_hashes_stay_strings(tmp_path):
    """`724e836309272529` reads as a float (inf) and `0012...` loses its zeros unless hashes are
    read as strings: the row's key is lost and the next upsert of that config duplicates it."""
    keys = ["724e836309272529", "0012345678901234"]
    for key in keys + keys:
        results_table.save_record(tmp_path, make_record(key, 0.5))
    assert table_hashes(tmp_path / "results.csv") == keys
    table = results_table.read_table(tmp_path / "results.csv")
    assert table["config_hash"].tolist() == keys


def mirror(root, sizes: dict[str, int]):
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x" * size + "\n")
    return str(root)


def test_config_hash_leaves_out_where_the_data_lies(tmp_path):
    files = {"org/a/default/validation.jsonl": 10, "org/b/x/test.jsonl": 20}
    here, there = mirror(tmp_path / "one", files), mirror(tmp_path / "two" / "deeper", files)
    config = {"seed": 0, "method": {"ratio": 0.25}}

    def at(root):
        return {
            **config,
            "data_root": root,
            "calib": {"data_root": root},
            "eval": {"data_root": root},
        }

    assert results.config_hash(at(here)) == results.config_hash(at(there))
    other = mirror(tmp_path / "three", {**files, "org/b/x/test.jsonl": 21})
    assert results.config_hash(at(here)) != results.config_hash(at(other))
    assert results.config_hash(at(here)) != results.config_hash(at(None))  # mirror vs the hub


def test_local_calibration_file_is_hashed_by_content_not_location(tmp_path):
    for folder, text in (("a", "one\n"), ("b", "one\n"), ("c", "two\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "calib.txt").write_text(text)

    def key(folder):
        return results.config_hash({"calib": {"path": str(tmp_path / folder / "calib.txt")}})

    assert key("a") == key("b") != key("c")


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "cut":
        path.write_bytes(data[: len(data) - 7])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(random.Random(0).randbytes(len(data)))


@pytest.mark.parametrize("how", ["cut", "empty", "random"])
def test_damaged_table_is_rebuilt_from_records(tmp_path, caplog, how):
    for key, acc in (("a", 0.5), ("b", 0.6), ("c", 0.7)):
        results_table.save_record(tmp_path, make_record(key, acc))
    damage(tmp_path / "results.csv", how)
    with caplog.at_level(logging.WARNING):
        results_table.save_record(tmp_path, make_record("d", 0.8))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "results.csv") in warnings[0], warnings
    table = results_table.read_table(tmp_path / "results.csv").sort_values("config_hash")
    assert table["config_hash"].tolist() == ["a", "b", "c", "d"]
    assert table["metrics.piqa/acc"].tolist() == [0.5, 0.6, 0.7, 0.8]
    assert table["layers_after"].tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("how", ["cut", "empty", "random"])
def test_damaged_record_is_moved_aside(tmp_path, caplog, how):
    results_table.save_record(tmp_path, make_record("a", 0.5))
    results_table.save_record(tmp_path, make_record("b", 0.6))
    path = results.record_path(tmp_path, "a")
    damage(path, how)
    with caplog.at_level(logging.WARNING):
        assert results.load_record(tmp_path, "a") is None
    assert str(path) in caplog.text
    assert not path.exists() and path.with_name("a.json.damaged").exists()
    results_table.upsert_row(tmp_path, make_record("b", 0.6), replace=False)
    assert table_hashes(tmp_path / "results.csv") == ["b"]  # no row without a record


def test_failure_marker_is_kept_until_the_point_is_recorded(tmp_path, caplog):
    assert results.load_failure(tmp_path, "a") is None
    results.save_failure(tmp_path, "a", "ValueError: bad", {"seed": 0})
    assert results.load_failure(tmp_path, "a")["error"] == "ValueError: bad"
    results.clear_failure(tmp_path, "a")
    assert results.load_failure(tmp_path, "a") is None
    results.save_failure(tmp_path, "b", "ValueError: bad", {"seed": 0})
    damage(results.failure_path(tmp_path, "b"), "cut")
    with caplog.at_level(logging.WARNING):
        assert results.load_failure(tmp_path, "b") is None
    assert str(results.failure_path(tmp_path, "b")) in caplog.text
    assert not results.failure_path(tmp_path, "b").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        results_table.save_record(tmp_path, make_record("a", 0.5))
        results_files.write_json_atomic(tmp_path / "run" / "results.json", make_record("a", 0.5))
    finally:
        os.umask(old)
    files = [results.record_path(tmp_path, "a"), tmp_path / "results.csv"]
    for path in [*files, tmp_path / "run" / "results.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
