"""Faults that need a real scheduler, on the one-node test cluster (`tests/slurm/start_cluster.sh`):
a job requeued while it computes (preemption: `scontrol requeue`), a job whose time limit ends
while it computes a curve, and two overlapping sweeps sharing one output root (claims).

Each fault meets a job in the middle of a point every time: `HoldPoint` (tests/slurm_jobs.py)
holds the job inside one point, claimed and not recorded, until the test lets it go. Nothing
is asserted about how long anything takes; waits have a generous bound (`WAIT_S`).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.slurm_jobs import REPO, WAIT_S, held_at, job_env, run_sweep, sweep_command, wait_for

pytestmark = pytest.mark.slurm

CURVE = "curve=[0.25,0.5,0.75]"  # one job computing three points


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def start_held(command: list[str], hold: Path) -> tuple[subprocess.Popen, str]:
    """Submit the sweep and wait until its job holds inside the held point: (sweep, job id)."""
    hold.touch()
    proc = start(command)
    held = hold.with_suffix(".held")
    wait_for(lambda: held.exists() and held.read_text(), "a job held inside a point", proc)
    return proc, held.read_text()


def finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=WAIT_S)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def folder_logs(tmp_path: Path) -> list[str]:
    """The logs (stdout and stderr) of each job, one string per submitit job folder."""
    folders = sorted(tmp_path.glob("multirun/*/*/.submitit/[0-9]*/"))
    return ["\n".join(p.read_text() for p in sorted(f.glob("*_log.*"))) for f in folders]


def job_logs(tmp_path: Path) -> str:
    return "\n".join(folder_logs(tmp_path))


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` as {field: value} (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def records(tmp_path: Path) -> dict[str, int]:
    """{record file: mtime} of the output root."""
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "records").glob("*.json")}


def assert_each_point_recorded_once(tmp_path: Path, points: int) -> None:
    """One record per point, one table row per record, no failure marker, no claim left."""
    names = records(tmp_path)
    assert len(names) == points, sorted(names)
    table = pd.read_csv(tmp_path / "results.csv", dtype={"config_hash": str})
    assert sorted(table["config_hash"]) == sorted(Path(n).stem for n in names)
    assert not list((tmp_path / "failures").glob("*.json"))
    assert not list((tmp_path / "claims").glob("*.json"))
    assert not list(tmp_path.glob("multirun/*/*/*/failed.json"))


def ended(job: str) -> bool:
    return job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def test_requeued_job_resumes_and_records_each_point_once(cluster, tmp_path, data_root):
    """Preemption: the job is requeued (`scontrol requeue`, as Slurm's preemption does) inside the
    curve's second point. SIGTERM stops it with one line and exit 143; Slurm starts it again and
    the same sweep finishes: the first point is not computed again, each point recorded once."""
    hold = tmp_path / "hold"
    command = sweep_command(tmp_path, data_root, CURVE, *held_at(hold, 0.5))
    proc, job = start_held(command, hold)
    first = records(tmp_path)
    assert len(first) == 1  # ratio 0.25 recorded; 0.5 claimed and being computed
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    # Slurm holds a requeued job back (BeginTime) for a while; let it start at once.
    wait_for(lambda: job_info(job).get("JobState") == "PENDING", "the job to be requeued", proc)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
    out = finish(proc)
    logs = job_logs(tmp_path)
    assert proc.returncode == 0, f"{out[-3000:]}\n{logs[-3000:]}"
    info = job_info(job)
    assert info["Restarts"] == "1", info
    assert "SIGTERM: stopped; the point being computed was abandoned" in logs, logs[-3000:]
    assert "1 of 3 point(s) recorded: ratio 0.25; not done: ratio 0.5, ratio 0.75" in logs
    assert_each_point_recorded_once(tmp_path, 3)
    assert {k: v for k, v in records(tmp_path).items() if k in first} == first


def cut_time_limit(job: str) -> None:
    """End the running job's Slurm time limit within two minutes: submitit's warning signal
    (`signal_delay_s`, 120 s, before the limit) is then due at slurmctld's next check."""
    minutes, _, seconds = job_info(job)["RunTime"].rpartition(":")
    elapsed_min = int(minutes.rpartition(":")[2] or 0) + (1 if int(seconds) else 0)
    subprocess.run(
        ["scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed_min + 1}"],
        check=True,
        timeout=30,
    )


def test_time_limit_stops_a_curve_in_one_line_and_the_rerun_computes_the_rest(
    cluster, tmp_path, data_root
):
    """The job's time limit ends inside the curve's second point. submitit judges a job timed out
    from `timeout_min` (2: any run time counts), and Slurm's own limit (`--time`, 30 min) is cut
    once the job is held, so the limit comes while a point is computed, on any node. The job
    stops with one line listing the finished point, no failure marker; the same command again
    computes only the two missing points."""
    hold = tmp_path / "hold"
    limits = ("hydra.launcher.timeout_min=2", "+hydra.launcher.additional_parameters.time=30")
    command = sweep_command(tmp_path, data_root, CURVE, *limits)
    proc, job = start_held([*command, *held_at(hold, 0.5)], hold)
    first = records(tmp_path)
    assert len(first) == 1
    cut_time_limit(job)
    out = finish(proc)
    wait_for(lambda: ended(job), "the job to end")
    logs = job_logs(tmp_path)
    assert proc.returncode != 0, out[-3000:]  # the sweep did not finish
    line = re.search(r"SIG\w+: stopped; the point being computed was abandoned.*", logs)
    assert line, logs[-3000:]
    assert "1 of 3 point(s) recorded: ratio 0.25; not done: ratio 0.5, ratio 0.75" in line[0]
    assert job_info(job)["ExitCode"] in ("140:0", "143:0"), job_info(job)  # 128 + the signal
    assert "Traceback" not in logs, logs[-3000:]
    assert not list((tmp_path / "failures").glob("*.json"))
    assert not list(tmp_path.glob("multirun/*/*/*/failed.json"))

    hold.unlink()
    again = run_sweep(command)
    assert again.returncode == 0, f"{again.stdout[-2000:]}\n{again.stderr[-2000:]}"
    assert_each_point_recorded_once(tmp_path, 3)
    assert {k: v for k, v in records(tmp_path).items() if k in first} == first


def test_overlapping_slurm_sweeps_compute_each_point_once(cluster, tmp_path, data_root):
    """Sweep A (ratios 0.25, 0.5) holds inside 0.5 while sweep B (0.5, 0.75) runs on the same
    output root: B's job for 0.5 finds A's claim, loads no model and waits; once A records 0.5,
    both sweeps end with 0 and each of the three points is recorded once."""
    hold = tmp_path / "hold"
    first, _ = start_held(sweep_command(tmp_path, data_root, "method.ratio=0.25,0.5",
                                        *held_at(hold, 0.5)), hold)  # fmt: skip
    second = start(sweep_command(tmp_path, data_root, "method.ratio=0.5,0.75"))
    try:
        wait_for(lambda: "that other runs" in job_logs(tmp_path), "sweep B to wait", second)
    finally:
        hold.unlink()
    out_a, out_b = finish(first), finish(second)
    logs = job_logs(tmp_path)
    assert first.returncode == 0, f"{out_a[-3000:]}\n{logs[-3000:]}"
    assert second.returncode == 0, f"{out_b[-3000:]}\n{logs[-3000:]}"
    assert_each_point_recorded_once(tmp_path, 3)
    waited = [log for log in folder_logs(tmp_path) if "that other runs" in log]
    assert len(waited) == 1, logs[-3000:]  # B's job for 0.5
    assert "waiting for 1 point(s) that other runs" in waited[0]
    assert "stage load" not in waited[0]  # it never loaded the model: it computed nothing
