"""Compression curves in one process, and sweeps that resume after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from mka_exp import pipeline
from mka_exp.results import load_record
from tests.helpers import REPO_ROOT, compose_config

SHRINK = ["eval.tasks=[piqa]", "eval.limit=6"]


@pytest.mark.parametrize("method", ["reverse_prune", "shortgpt", "mka", "angular"])
def test_curve_point_equals_single_run(method, tmp_path, data_root):
    curve_cfg = compose_config(
        [f"method={method}", "curve=[0.25,0.5]", *SHRINK], tmp_path / "curve", data_root
    )
    pipeline.run(curve_cfg)
    for ratio in (0.25, 0.5):
        single_cfg = compose_config(
            [f"method={method}", f"method.ratio={ratio}", *SHRINK], tmp_path / "single", data_root
        )
        single = pipeline.run(single_cfg)
        point = load_record(tmp_path / "curve", single["config_hash"])
        assert point is not None, f"curve has no point with the single run's config at {ratio}"
        assert point["method_stats"]["removed_layers"] == single["method_stats"]["removed_layers"]
        assert point["layers_after"] == single["layers_after"] == 4 - round(4 * ratio)
        assert point["metrics"] == pytest.approx(single["metrics"], abs=1e-6)


def test_curve_resumes_point_by_point(tmp_path, data_root, monkeypatch):
    cfg = compose_config(["method=reverse_prune", "curve=[0.25,0.5]", *SHRINK], tmp_path, data_root)
    single = ["method=reverse_prune", "method.ratio=0.25", *SHRINK]
    first = pipeline.run(compose_config(single, tmp_path, data_root))
    evaluated = []
    real = pipeline.measure_point

    def spy(point, *args, **kwargs):
        evaluated.append(point.cfg.method.ratio)
        return real(point, *args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_point", spy)
    last = pipeline.run(cfg)
    assert evaluated == [0.5]
    assert load_record(tmp_path, first["config_hash"]) == first
    assert last["layers_after"] == 2


def test_killed_sweep_finishes_every_point_once(tmp_path, data_root):
    args = [
        sys.executable, "run.py", "-m", "model=tiny_llama", "logger=none", "method=reverse_prune",
        "method.ratio=0.25,0.5,0.75", "eval.tasks=[piqa]", "eval.limit=20",
        f"data_root={data_root}", f"paths.output_root={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    records = tmp_path / "records"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(records.glob("*.json"))) < 1:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 1 <= len(finished) < 3, "the sweep should have been killed mid-way"
    subprocess.run(args, cwd=REPO_ROOT, check=True, capture_output=True, timeout=900)
    assert len(list(records.glob("*.json"))) == 3
    for name, mtime in finished.items():
        assert (records / name).stat().st_mtime_ns == mtime, "a finished point was recomputed"
    table = pd.read_csv(tmp_path / "results.csv")
    assert sorted(table["layers_after"]) == [1, 2, 3] and table["config_hash"].is_unique
    assert not list(tmp_path.rglob("*.tmp"))
