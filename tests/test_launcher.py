"""`hydra/launcher=slurm|local`: both compose onto hydra-submitit-launcher's schema, and a real
two-job sweep through submitit's local executor writes two records and a two-row table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mka_exp.report.cli import main as report_main

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"


def launcher(option: str) -> DictConfig:
    """The composed `hydra.launcher` node (composition fails on any key the schema lacks)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={option}"], return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_defaults_fit_one_gpu_job(monkeypatch):
    monkeypatch.delenv("MKA_EXP_SLURM_PARTITION", raising=False)
    node = launcher("slurm")
    assert node._target_ == f"{PLUGIN}.SlurmLauncher"
    assert (node.nodes, node.tasks_per_node, node.gpus_per_node) == (1, 1, 1)
    assert node.cpus_per_task >= 4 and node.mem_gb >= 32 and node.timeout_min >= 60
    assert node.array_parallelism >= 1 and node.max_num_timeout == 0
    assert node.partition is None and node.account is None and node.qos is None
    assert node.submitit_folder.endswith("/.submitit/%j")  # job logs inside the sweep dir


def test_slurm_site_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MKA_EXP_SLURM_PARTITION", "gpu-a100")
    monkeypatch.setenv("MKA_EXP_SLURM_ACCOUNT", "lab42")
    node = launcher("slurm")
    assert (node.partition, node.account) == ("gpu-a100", "lab42")


def test_local_launcher():
    node = launcher("local")
    assert node._target_ == f"{PLUGIN}.LocalLauncher"
    # submitit's local executor hides every GPU (CUDA_VISIBLE_DEVICES="") unless asked for one.
    assert node.gpus_per_node == 1 and node.timeout_min >= 60
    assert "partition" not in node  # a slurm-only key would mean the wrong schema


def test_local_sweep_runs_two_jobs(tmp_path, data_root):
    command = [sys.executable, "run.py", "-m", "hydra/launcher=local", "model=tiny_llama"]
    command += ["logger=none", "method=none,reverse_prune", "eval.tasks=[piqa]", "eval.limit=2"]
    command += ["calib.max_length=32", f"data_root={data_root}", f"paths.output_root={tmp_path}"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    logs = "\n".join(p.read_text() for p in tmp_path.rglob(".submitit/*/*_log.*"))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs[-3000:]}"
    records = sorted((tmp_path / "records").glob("*.json"))
    assert len(records) == 2
    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == 2 and set(table["method"]) == {"none", "reverse_prune"}
    assert table["metrics.piqa/acc"].notna().all()
    jobs = sorted(p.parent.name for p in (tmp_path / "multirun").glob("*/*/*/results.json"))
    assert jobs == ["0", "1"]  # one sweep subdir per job, each with its results.json
    assert report_main([str(tmp_path)]) == 0  # the sweep's real records make a report
    assert len(pd.read_csv(tmp_path / "report" / "table2.csv")) == 2
