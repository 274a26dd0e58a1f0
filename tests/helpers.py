"""Compose the real Hydra configs and shrink them for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"


def compose_config(overrides: list[str], tmp_path: Path, data_root: Path) -> DictConfig:
    """The real config with the tiny model, offline data and all outputs under `tmp_path`."""
    base = [
        "model=tiny_llama",
        "logger=none",
        f"data_root={data_root}",
        f"paths.output_root={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.records_dir={tmp_path}",
        "calib.max_length=64",
        "eval.limit=4",
        "eval.batch_size=4",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=base + overrides)
