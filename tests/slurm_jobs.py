"""Helpers of the slurm test tier (tests/test_slurm*.py): the sweep command of the tiny model on
the one-node test cluster (`tests/slurm/start_cluster.sh`), the jobs' environment, squeue and
submitit's job folders, and waiting for a condition with a generous bound."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback

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


def sweep_command(tmp_path: Path, data_root: Path, points: str = "", *extra: str) -> list[str]:
    """The sweep of the tiny model on a CPU node; `points` the override that sets its points
    (by default `method.ratio=0.25,0.5,0.75`: three jobs), `extra` more overrides."""
    points = points or f"method.ratio={','.join(map(str, RATIOS))}"
    return [
        *(sys.executable, "run.py", "-m", "hydra/launcher=slurm", "model=tiny_llama"),
        *("logger=none", "method=reverse_prune", points),
        *("eval.tasks=[piqa]", "eval.limit=8", "calib.max_length=32"),
        *(f"data_root={data_root}", f"paths.output_root={tmp_path}"),
        # a CPU node: no GPU request, one core and a little memory per job
        *("hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1"),
        *("hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20", *extra),
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


def held_at(hold: Path, ratio: float) -> list[str]:
    """Overrides that hold the sweep's jobs inside the point at `ratio` (`HoldPoint`)."""
    return [
        "+hydra.callbacks.hold._target_=tests.slurm_jobs.HoldPoint",
        f"+hydra.callbacks.hold.hold={hold}",
        f"+hydra.callbacks.hold.ratio={ratio}",
    ]


class HoldPoint(Callback):
    """Test-only (a Hydra callback run in the job): on the job's first start, while the file
    `hold` exists, the point at `ratio` waits after it is claimed and compressed, before it is
    evaluated and recorded; `<hold>.held` names the waiting job. A fault (requeue, time limit,
    a second sweep) then meets a job in the middle of a point every time, whatever the node's
    speed, instead of racing a point that takes a second on the tiny model."""

    def __init__(self, hold: str, ratio: float) -> None:
        self.hold, self.ratio = Path(hold), ratio

    def on_job_start(self, config, **kwargs) -> None:
        from submitit import JobEnvironment

        from mka_exp import pipeline

        if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return  # a requeued job runs freely
        finish = pipeline.finish_point

        def held(point, *args, **kw):
            if point.cfg.method.ratio == self.ratio and self.hold.exists():
                self.hold.with_suffix(".held").write_text(JobEnvironment().job_id)  # 12_0
                while self.hold.exists():
                    time.sleep(0.2)  # SIGTERM here raises the pipeline's `Interrupted`
            return finish(point, *args, **kw)

        pipeline.finish_point = held
