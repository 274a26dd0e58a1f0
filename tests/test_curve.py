"""Compression curves in one process, and sweeps that resume after a SIGKILL."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mka_exp import pipeline
from mka_exp.results.records import load_record
from mka_exp.results.table import read_table
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


@pytest.mark.parametrize("method", ["reverse_prune", "shortgpt"])
def test_one_point_curve_cuts_at_its_ratio_not_the_method_default(method, tmp_path, data_root):
    """`curve=[0.5]` is the single run at 0.5, not at the yaml's ratio (0.25) under 0.5's label."""
    cfg = compose_config([f"method={method}", "curve=[0.5]", *SHRINK], tmp_path, data_root)
    assert cfg.method.ratio == 0.25
    record = pipeline.run(cfg)
    assert record["config"]["method"]["ratio"] == 0.5
    assert record["layers_after"] == 2 and len(record["method_stats"]["removed_layers"]) == 2


def test_curve_resumes_point_by_point(tmp_path, data_root, watch_evaluations):
    cfg = compose_config(["method=reverse_prune", "curve=[0.25,0.5]", *SHRINK], tmp_path, data_root)
    single = ["method=reverse_prune", "method.ratio=0.25", *SHRINK]
    first = pipeline.run(compose_config(single, tmp_path, data_root))
    evaluated = watch_evaluations()
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
    table = read_table(tmp_path / "results.csv")  # hashes as strings, whatever they look like
    assert sorted(table["layers_after"]) == [1, 2, 3] and table["config_hash"].is_unique
    assert sorted(table["config_hash"]) == sorted(p.stem for p in records.glob("*.json"))
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_false_recomputes_and_overwrites(tmp_path, data_root, monkeypatch, caplog):
    single = ["method=reverse_prune", "method.ratio=0.25", *SHRINK]
    first = pipeline.run(compose_config(single, tmp_path, data_root))
    path = tmp_path / "records" / f"{first['config_hash']}.json"
    os.utime(path, ns=(0, 0))  # a rewrite shows as a new mtime, however fast the run
    evaluated = []
    real = pipeline.measure_point
    monkeypatch.setattr(
        pipeline, "measure_point", lambda p, *a, **k: evaluated.append(1) or real(p, *a, **k)
    )
    with caplog.at_level(logging.INFO, logger="mka_exp.pipeline"):
        again = pipeline.run(compose_config([*single, "resume=false"], tmp_path, data_root))
    assert evaluated == [1] and path.stat().st_mtime_ns != 0
    assert again["config_hash"] == first["config_hash"] and again["metrics"] == first["metrics"]
    assert "resume=false: computing 1 recorded point(s) again" in caplog.text
    assert first["config_hash"] in caplog.text
    assert len(read_table(tmp_path / "results.csv")) == 1


def test_skipped_run_copies_its_record_into_its_run_dir(tmp_path, data_root):
    single = ["method=reverse_prune", "method.ratio=0.25", *SHRINK]
    first = pipeline.run(compose_config(single, tmp_path, data_root))
    rerun = compose_config([*single, f"paths.output_dir={tmp_path / 'rerun'}"], tmp_path, data_root)
    assert pipeline.run(rerun) == first
    assert json.loads((tmp_path / "rerun" / "results.json").read_text()) == first


def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    """The date/time prefix stays; a random suffix (drawn once per config) keeps them apart."""
    import mka_exp.sweep.callbacks  # noqa: F401  (what Hydra imports for hydra.callbacks: ${unique:})

    def frozen(pattern: str) -> str:  # both runs start in the same second
        return datetime.datetime(2026, 1, 2, 3, 4, 5).strftime(pattern)

    dirs = []
    for _ in range(2):
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            OmegaConf.register_new_resolver("now", frozen, replace=True, use_cache=True)
            cfg = compose("config", [f"paths.output_root={tmp_path}"], return_hydra_config=True)
            dirs.append((cfg.hydra.run.dir, cfg.hydra.sweep.dir))
            assert cfg.hydra.run.dir == dirs[-1][0]  # drawn once per config
    (run_a, sweep_a), (run_b, sweep_b) = dirs
    assert run_a != run_b and sweep_a != sweep_b
    for path in (run_a, run_b):
        assert re.fullmatch(rf"{tmp_path}/runs/2026-01-02/03-04-05-[0-9a-f]{{6}}", path), path


def test_sweep_reports_a_bad_point_and_runs_the_rest(tmp_path, data_root):
    """A bad middle point: the other two are recorded, the bad one leaves a failure marker (no
    record), the sweep ends with a summary naming it and exit status 1; a rerun retries it."""
    args = [
        sys.executable, "run.py", "-m", "model=tiny_llama", "logger=none", "method=reverse_prune",
        "method.ratio=0.25,0.05,0.5", "eval.tasks=[piqa]", "eval.limit=2", "calib.max_length=32",
        f"data_root={data_root}", f"paths.output_root={tmp_path}",
    ]  # fmt: skip
    out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    first = subprocess.run(args, cwd=REPO_ROOT, **out)
    assert first.returncode == 1, first.stdout[-3000:]
    summary = first.stdout[first.stdout.index("1 of 3 sweep job(s) failed") :]
    assert "method.ratio=0.05 " in summary and "ValueError: method.ratio=0.05 removes 0" in summary
    records = sorted((tmp_path / "records").glob("*.json"))
    assert len(records) == 2
    assert sorted(json.loads(p.read_text())["layers_after"] for p in records) == [2, 3]
    failures = list((tmp_path / "failures").glob("*.json"))
    assert len(failures) == 1 and failures[0].name not in {p.name for p in records}
    marker = json.loads(failures[0].read_text())
    assert marker["config"]["method"]["ratio"] == 0.05 and marker["error"].startswith("ValueError")
    sweep_dirs = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweep_dirs) == 1 and re.fullmatch(r"\d\d-\d\d-\d\d-[0-9a-f]{6}", sweep_dirs[0].name)
    second = subprocess.run(args, cwd=REPO_ROOT, **out)
    assert (
        second.returncode == 1 and "failed before (ValueError: method.ratio=0.05" in second.stdout
    )
    assert sorted((tmp_path / "records").glob("*.json")) == records


def test_a_cut_that_disagrees_with_its_point_is_never_recorded(tmp_path, data_root, monkeypatch):
    from mka_exp.methods.reverse_prune import ReversePrune

    real = ReversePrune.compress

    def one_short(self, model, calib):
        stats = real(self, model, calib)
        return {**stats, "removed_layers": stats["removed_layers"][1:]}

    monkeypatch.setattr(ReversePrune, "compress", one_short)
    cfg = compose_config(["method=reverse_prune", "method.ratio=0.5", *SHRINK], tmp_path, data_root)
    with pytest.raises(RuntimeError, match=r"method removed 1 layers \[3\] where the point asks"):
        pipeline.run(cfg)
    assert not list(tmp_path.rglob("records/*.json"))
