"""SparseGPT through llm-compressor: achieved sparsity, 2:4 structure, argument checks, saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from mka_exp.calibration import tokenize
from mka_exp.methods.sparsegpt import SparseGPT
from mka_exp.models.saving import save_compressed
from mka_exp.models.toy import build_random_model
from mka_exp.quantizers.accounting import zero_fraction

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Question: is it true? Answer: yes",
    "0123456789 abc def. Question: A. B. C. D. Answer: C",
    "yes no true false the of and to in is was for on that with as by at from",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ (the alphabet) and some punctuation: .,;:!?",
]


def tiny128():
    return build_random_model(
        num_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        num_kv_heads=2,
        device="cpu",
    )


def calib_for(lm):
    return tokenize(TEXTS, lm.tokenizer, max_length=48, name="toy", batch_size=4)


def decoder_linears(model):
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    }


def test_unstructured_sparsity_per_linear_and_reload(tmp_path):
    lm = tiny128()
    ratio = 0.3
    stats = SparseGPT(ratio=ratio).compress(lm.model, calib_for(lm))
    linears = decoder_linears(lm.model)
    assert stats["pruned_modules"] == len(linears) == 14
    for name, module in linears.items():
        fraction = float((module.weight == 0).float().mean())
        assert abs(fraction - ratio) <= 1 / module.in_features, (name, fraction)
    assert not (lm.model.lm_head.weight == 0).any()  # ignored
    assert stats["sparsity"] == pytest.approx(zero_fraction(lm.model), abs=1e-9)
    assert stats["sparsity_min"] <= stats["sparsity"] <= stats["sparsity_max"]
    assert abs(stats["sparsity"] - ratio) < 0.01

    ids = calib_for(lm).input_ids[:2]
    with torch.no_grad():
        expected = lm.model(ids).logits
    save_compressed(lm.model, lm.tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)


def test_two_four_structure():
    lm = tiny128()
    stats = SparseGPT(ratio=0.5, mask_structure="2:4").compress(lm.model, calib_for(lm))
    for name, module in decoder_linears(lm.model).items():
        groups = module.weight.detach().reshape(module.out_features, -1, 4)
        zeros_per_group = (groups == 0).sum(dim=-1)
        assert int(zeros_per_group.min()) >= 2, name
    assert stats["mask_structure"] == "2:4" and stats["sparsity_min"] >= 0.5


def test_zero_ratio_is_a_no_op():
    lm = tiny128()
    before = {n: m.weight.detach().clone() for n, m in decoder_linears(lm.model).items()}
    stats = SparseGPT(ratio=0.0).compress(lm.model, calib_for(lm))
    assert stats["sparsity"] == 0.0
    for name, module in decoder_linears(lm.model).items():
        assert torch.equal(module.weight, before[name])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, r"must be in \[0, 1\)"),
        ({"ratio": -0.1}, r"must be in \[0, 1\)"),
        ({"ratio": "half"}, r"must be in \[0, 1\)"),
        ({"ratio": 0.5, "mask_structure": "4:2"}, "mask_structure='4:2'"),
        ({"ratio": 0.5, "mask_structure": "dense"}, "mask_structure='dense'"),
        ({"ratio": 0.3, "mask_structure": "2:4"}, "set method.ratio=0.5"),
        ({"ratio": 0.5, "dampening_frac": 1.5}, "dampening_frac"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseGPT(**kwargs)


def test_needs_calibration_data():
    lm = tiny128()
    with pytest.raises(ValueError, match="needs calibration data"):
        SparseGPT(ratio=0.5).compress(lm.model, None)


def test_config_instantiates():
    method = instantiate(OmegaConf.load(REPO / "conf" / "method" / "sparsegpt.yaml"))
    assert isinstance(method, SparseGPT)
    assert method.ratio == 0.5 and method.mask_structure == "0:0"
