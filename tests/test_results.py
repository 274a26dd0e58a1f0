"""Records and the aggregated table: hashing, atomic writes, concurrent writers."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp

import pandas as pd

from mka_exp import results


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
    results.save_record(tmp_path, make_record("a", 0.5))
    results.save_record(tmp_path, make_record("b", 0.6))
    results.save_record(tmp_path, make_record("a", 0.7))
    table = pd.read_csv(tmp_path / "results.csv").sort_values("config_hash")
    assert table["config_hash"].tolist() == ["a", "b"]
    assert table["metrics.piqa/acc"].tolist() == [0.7, 0.6]
    assert results.load_record(tmp_path, "a")["metrics"]["piqa/acc"] == 0.7
    assert results.load_record(tmp_path, "missing") is None
    assert not list(tmp_path.rglob("*.tmp"))


def write_many(records_dir, worker: int, count: int) -> None:
    for i in range(count):
        results.save_record(records_dir, make_record(f"w{worker}-{i}", i / count))


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
    rebuilt = results.rebuild_table(tmp_path)
    assert sorted(rebuilt["config_hash"]) == sorted(table["config_hash"])


def test_write_json_atomic_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    results.write_json_atomic(path, {"a": 1})
    with contextlib.suppress(RuntimeError):
        results.write_json_atomic(path, {"bad": object.__new__(BrokenJson)})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


class BrokenJson:
    def __str__(self) -> str:
        raise RuntimeError("cannot serialise")


def test_missing_row_is_restored_without_touching_the_record(tmp_path):
    results.save_record(tmp_path, make_record("a", 0.5))
    results.write_json_atomic(results.record_path(tmp_path, "b"), make_record("b", 0.6))
    record_b = results.load_record(tmp_path, "b")
    results.upsert_row(tmp_path, record_b, replace=False)
    results.upsert_row(tmp_path, {**record_b, "model": "changed"}, replace=False)
    table = pd.read_csv(tmp_path / "results.csv").set_index("config_hash")
    assert sorted(table.index) == ["a", "b"] and table.loc["b", "model"] == "m"
