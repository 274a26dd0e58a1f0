"""Shared fixtures: a tiny Llama with an in-process tokenizer, and the offline benchmark mirror."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mka_exp.models.loading import LoadedModel
from mka_exp.models.toy import build_random_model
from tests.slurm_jobs import slurm_missing

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The offline mirror of the five evaluation datasets (read from ../shared, never copied)."""
    if not SHARED_BENCHMARKS.exists():
        pytest.fail(f"offline benchmark mirror missing: {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS


@pytest.fixture
def tiny() -> LoadedModel:
    """A fresh 4-layer Llama (hidden 64) with random weights; cheap enough to build per test."""
    return build_random_model("llama", num_layers=4, hidden_size=64, device="cpu")


class ModelLoaded(Exception):
    """Raised instead of loading the model: a check that should have failed first did not."""


@pytest.fixture
def no_model(monkeypatch):
    """The pipeline refuses to load a model: a test that a bad setting stops the run before."""
    from mka_exp import pipeline

    def refuse(*args, **kwargs):
        raise ModelLoaded("the model was loaded before the bad setting was found")

    monkeypatch.setattr(pipeline, "load_session", refuse)


@pytest.fixture(scope="module")
def cluster() -> None:
    """A Slurm cluster answers: else the test is skipped, or fails under MKA_EXP_REQUIRE_SLURM=1."""
    reason = slurm_missing()
    if reason and os.environ.get("MKA_EXP_REQUIRE_SLURM") == "1":
        pytest.fail(f"MKA_EXP_REQUIRE_SLURM=1 but {reason}; run tests/slurm/start_cluster.sh")
    if reason:
        pytest.skip(f"{reason}; start one with tests/slurm/start_cluster.sh")


@pytest.fixture
def watch_evaluations(monkeypatch):
    """Call it to start watching: it returns the list that then receives the method ratio of
    every point the pipeline evaluates, in order (a resumed run's recorded points are not)."""
    from mka_exp import pipeline

    def start() -> list:
        ratios: list = []
        real = pipeline.measure_point

        def spy(point, *args, **kwargs):
            ratios.append(point.cfg.method.ratio)
            return real(point, *args, **kwargs)

        monkeypatch.setattr(pipeline, "measure_point", spy)
        return ratios

    return start
