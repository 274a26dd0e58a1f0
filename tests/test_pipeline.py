"""End to end on the tiny model and the offline mirror: the record, resume, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from mka_exp import pipeline
from tests.helpers import REPO_ROOT, compose_config


def test_reverse_prune_run_writes_complete_record(tmp_path, data_root):
    cfg = compose_config(
        ["method=reverse_prune", "method.ratio=0.25", "eval.tasks=[piqa,boolq]"],
        tmp_path,
        data_root,
    )
    record = pipeline.run(cfg)
    assert record["layers_before"] == 4 and record["layers_after"] == 3
    assert record["method_stats"]["removed_layers"] == [3]
    assert record["params_after"] < record["params_before"]
    assert {"piqa/acc", "piqa/acc_norm", "boolq/acc"} <= set(record["metrics"])
    assert all(math.isfinite(v) for v in record["metrics"].values())
    assert set(record["timings"]) >= {"load", "calibrate", "compress", "evaluate"}
    assert record["peak_memory_bytes"] > 0 and len(record["config_hash"]) == 16
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["metrics"] == record["metrics"]
    table = pd.read_csv(tmp_path / "results.csv")
    assert table["config_hash"].tolist() == [record["config_hash"]]
    assert table["metrics.piqa/acc"].iloc[0] == pytest.approx(record["metrics"]["piqa/acc"])


def test_finished_config_is_skipped(tmp_path, data_root, monkeypatch):
    cfg = compose_config(["method=none", "eval.tasks=[piqa]"], tmp_path, data_root)
    first = pipeline.run(cfg)

    def fail(*args, **kwargs):
        raise AssertionError("a finished config must not be recomputed")

    monkeypatch.setattr(pipeline, "load_session", fail)
    assert pipeline.run(cfg) == first
    changed = compose_config(["method=none", "eval.tasks=[piqa]", "seed=1"], tmp_path, data_root)
    with pytest.raises(AssertionError, match="must not be recomputed"):
        pipeline.run(changed)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.ratio=1.5", "method.ratio=1.5 is outside the allowed range"),
        ("method.ratio=0.05", "removes 0 of 4 layers"),
        ("eval.tasks=[hellaswg]", "hellaswag"),
        ("model=llama3_8b model.name_or_path=/nonexistent/llama", "/nonexistent/llama"),
    ],
)
def test_bad_input_fails_before_any_record(tmp_path, data_root, override, message):
    cfg = compose_config(["method=reverse_prune", *override.split()], tmp_path, data_root)
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(cfg)
    assert exit_info.value.code == 2
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "records").exists()
    with pytest.raises(Exception, match=message):
        pipeline.run(cfg)


def test_cli_unknown_option_is_one_line_with_a_close_match(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", "method=mkaa", f"paths.output_root={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("ERROR: ConfigError: method=mkaa: unknown method 'mkaa' (options: ")
    assert "reverse_prune" in line and line.endswith("; did you mean mka?)")
    assert not list(tmp_path.iterdir())


def test_cli_bad_value_is_one_line(tmp_path, data_root):
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "model=tiny_llama",
            "logger=none",
            "method.ratio=2",
            f"data_root={data_root}",
            f"paths.output_root={tmp_path}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr  # Hydra's job logging writes to stdout
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "method.ratio=2 is outside" in errors[0], output
    assert "Traceback" not in output
    assert not list(tmp_path.rglob("results.json"))
