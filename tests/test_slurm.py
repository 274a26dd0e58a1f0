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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mka_exp.sweep.squeue_fallback import GONE, SqueueFallbackWatcher

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.25, 0.5, 0.75)
WAIT_S = 900  # a generous bound on a hung sweep; the test takes about a minute when healthy


def slurm_missing() -> str | None:
    """Why no Slurm cluster can be used here, or None when slurmctld answers."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no Slurm client (sbatch, scontrol) on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no slurmctld reachable (scontrol ping did not answer in 20 s)"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"no slurmctld reachable (scontrol ping: {(ping.stdout + ping.stderr).strip()})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    reason = slurm_missing()
    if reason and os.environ.get("MKA_EXP_REQUIRE_SLURM") == "1":
        pytest.fail(f"MKA_EXP_REQUIRE_SLURM=1 but {reason}; run tests/slurm/start_cluster.sh")
    if reason:
        pytest.skip(f"{reason}; start one with tests/slurm/start_cluster.sh")


def sweep_command(tmp_path: Path, data_root: Path) -> list[str]:
    ratios = ",".join(map(str, RATIOS))
    return [
        *(sys.executable, "run.py", "-m", "hydra/launcher=slurm", "model=tiny_llama"),
        *("logger=none", "method=reverse_prune", f"method.ratio={ratios}"),
        *("eval.tasks=[piqa]", "eval.limit=8", "calib.max_length=32"),
        *(f"data_root={data_root}", f"paths.output_root={tmp_path}"),
        # a CPU node: no GPU request, one core and a little memory per job
        *("hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1"),
        *("hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20"),
    ]


def job_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for site in ("MKA_EXP_SLURM_PARTITION", "MKA_EXP_SLURM_ACCOUNT", "MKA_EXP_SLURM_QOS"):
        env.pop(site, None)
    return env


def squeue(job: str) -> dict[str, str]:
    """`{task id: state}` of one array job (ended tasks too, for the cluster's MinJobAge)."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-r", "-j", job, "-o", "%i|%T"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return dict(line.split("|", 1) for line in out.split())


def job_folders(tmp_path: Path) -> list[Path]:
    """submitit's per-task folders (`.submitit/<array id>_<task>`), once submitted."""
    return sorted(tmp_path.glob("multirun/*/*/.submitit/[0-9]*_[0-9]*"))


def started(folder: Path) -> bool:
    """The job runs: submitit has started it, and it is still importing (torch, lm-eval) and
    then building tasks, loading, compressing: tens of seconds, far beyond the test cluster's
    KillWait (2 s; a cancelled job dies then, as submitit ignores the first SIGTERM)."""
    return any("Starting with JobEnvironment" in p.read_text() for p in folder.glob("*_log.out"))


def wait_for(condition, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"sweep exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def run_sweep(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=WAIT_S
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
