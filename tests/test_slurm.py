"""`hydra/launcher=slurm` against a real slurmctld (`tests/slurm/start_cluster.sh`; CI starts one),
and its CPU-node settings and squeue fallback without one.

A three-point sweep of the tiny model is submitted as one array job; one running job is
cancelled with `scancel`; the sweep ends non-zero (the launcher learns of the cancel from
squeue, since the test cluster keeps no accounting); the resubmitted sweep computes only the
cancelled point, and every point ends up recorded exactly once. Skipped (with the reason) where
no slurmctld answers, unless MKA_EXP_REQUIRE_SLURM=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mka_exp.sweep.squeue_fallback import GONE, SqueueFallbackWatcher
from tests.slurm_jobs import (
    RATIOS,
    REPO,
    WAIT_S,
    job_env,
    job_folders,
    run_sweep,
    squeue,
    started,
    sweep_command,
    wait_for,
)


@pytest.mark.slurm
def test_cancelled_job_is_finished_by_resubmission_and_every_point_recorded_once(
    cluster, tmp_path, data_root
):
    command = sweep_command(tmp_path, data_root)
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        folders = wait_for(lambda: job_folders(tmp_path), "submission", proc)
        victim = wait_for(lambda: next(filter(started, job_folders(tmp_path)), None), "a job", proc)
        array = victim.name.split("_")[0]
        subprocess.run(["scancel", victim.name], check=True, timeout=30)
        out, _ = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(folders) == len(RATIOS)
    # The launcher learned of the cancel (squeue fallback) instead of waiting forever.
    assert proc.returncode != 0, out[-3000:]
    assert "has not produced any output" in out, out[-3000:]
    assert "Bypassing sacct error" not in out  # quiet polling
    wait_for(
        lambda: all(s in ("COMPLETED", "CANCELLED", "FAILED") for s in squeue(array).values()),
        "the array job to drain",
    )
    states = squeue(array)
    assert states[victim.name] == "CANCELLED", states
    records = tmp_path / "records"
    first = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(first) == len(RATIOS) - 1, states

    again = run_sweep(command)
    logs = "\n".join(p.read_text() for p in tmp_path.rglob(".submitit/*/*_log.*"))
    assert again.returncode == 0, f"{again.stdout[-2000:]}\n{again.stderr[-2000:]}\n{logs[-3000:]}"
    second = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(second) == len(RATIOS)
    assert {k: second[k] for k in first} == first  # finished points were not recomputed
    table = pd.read_csv(tmp_path / "results.csv", dtype={"config_hash": str})
    assert sorted(table["config_hash"]) == sorted(Path(k).stem for k in second)
    assert sorted(table["layers_after"]) == [1, 2, 3]  # 4 layers less 3, 2 and 1


def fake_slurm_commands(tmp_path: Path, monkeypatch, squeue_lines: str) -> Path:
    """`sacct` as on a cluster without accounting, `squeue` printing `squeue_lines`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sacct_calls"
    sacct = f"echo x >> {calls}\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n"
    (bin_dir / "sacct").write_text(f"#!/bin/sh\n{sacct}")
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat <<'EOF'\n{squeue_lines}EOF\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_squeue_fallback_gives_states_and_ends_jobs_that_left_the_queue(
    tmp_path, monkeypatch, caplog
):
    lines = "7_0|CANCELLED|node1\n7_1|RUNNING|node1\n7_[2-3]|PENDING|\n"
    sacct_calls = fake_slurm_commands(tmp_path, monkeypatch, lines)
    watcher = SqueueFallbackWatcher(delay_s=60)
    jobs = ["7_0", "7_1", "7_2", "7_3", "5_0"]
    for job in jobs:
        watcher.register_job(job)
    with caplog.at_level("INFO", logger="mka_exp.sweep.squeue_fallback"):
        watcher.update()
        watcher.update()
    states = {job: watcher.get_state(job, mode="cache") for job in jobs}
    assert states == {
        "7_0": "CANCELLED",
        "7_1": "RUNNING",
        "7_2": "PENDING",
        "7_3": "PENDING",
        "5_0": GONE,  # purged from squeue without a result: ended, not waited for forever
    }
    assert [watcher.is_done(job, mode="cache") for job in jobs] == [True, False, False, False, True]
    assert len(sacct_calls.read_text().split()) == 1  # accounting is off: asked once
    notes = [r for r in caplog.records if "sacct unavailable" in r.getMessage()]
    assert len(notes) == 1 and "accounting storage is disabled" in notes[0].getMessage()


def slurm_launcher(monkeypatch, gpus: str | None):
    if gpus is None:
        monkeypatch.delenv("MKA_EXP_SLURM_GPUS_PER_NODE", raising=False)
    else:
        monkeypatch.setenv("MKA_EXP_SLURM_GPUS_PER_NODE", gpus)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    return cfg.hydra


@pytest.mark.parametrize(("env", "gpus"), [(None, 1), ("null", None), ("0", 0), ("4", 4)])
def test_slurm_gpus_come_from_the_environment(monkeypatch, env, gpus):
    """A CPU partition asks for no GPU with MKA_EXP_SLURM_GPUS_PER_NODE=null."""
    hydra = slurm_launcher(monkeypatch, env)
    assert hydra.launcher.gpus_per_node == gpus
    assert (
        hydra.callbacks.squeue_fallback._target_ == "mka_exp.sweep.squeue_fallback.SqueueFallback"
    )
