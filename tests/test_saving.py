"""Saving a model loaded from a folder, then cut and quantized: the saved one is the cut one."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from mka_exp.calibration import tokenize
from mka_exp.layers import remove_layers
from mka_exp.models.saving import save_compressed
from mka_exp.models.toy import build_random_model
from mka_exp.quantizers.llmcompressor import RTN


def test_pruned_quantized_model_saves_its_own_layer_count(tmp_path):
    """llm-compressor rewrites config.json from the folder the model was loaded from; a model
    cut from 3 to 2 layers must not come back with 3 (Qwen2.5-Coder + rtn + save showed it)."""
    lm = build_random_model(num_layers=3, hidden_size=128, intermediate_size=256, device="cpu")
    dense = tmp_path / "dense"
    lm.model.save_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense).eval()  # config._name_or_path = dense
    remove_layers(model, [2])
    ids = tokenize(["a b c d e f g", "0 1 2 3"], lm.tokenizer, 16, "toy", 2).input_ids
    model, _ = RTN(bits=4).quantize(model, lm.tokenizer, None)
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, lm.tokenizer, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["num_hidden_layers"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)
