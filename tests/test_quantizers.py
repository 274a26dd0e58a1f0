"""Quantizers (llm-compressor, bitsandbytes), the paper's compression-ratio accounting, saving."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from mka_exp.calibration import tokenize
from mka_exp.models.saving import save_compressed
from mka_exp.models.toy import build_random_model
from mka_exp.quantizers import NoQuant
from mka_exp.quantizers.accounting import paper_compression_ratio, parameter_count, zero_fraction
from mka_exp.quantizers.bnb import BnbInt8, BnbNF4
from mka_exp.quantizers.llmcompressor import AWQ, GPTQ, RTN, SmoothQuant, resolve_group_size

REPO = Path(__file__).resolve().parents[1]
PAPER_RESULTS = REPO.parent / "shared" / "paper" / "paper_results.csv"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Question: is it true? Answer: yes",
    "0123456789 abc def. Question: A. B. C. D. Answer: C",
    "yes no true false the of and to in is was for on that with as by at from",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ (the alphabet) and some punctuation: .,;:!?",
]


def tiny128():
    """Two Llama layers whose widths (128, 256) take group size 128."""
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


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight the quantized forward uses: compressed-tensors' fake quantization of `weight`.

    RTN and AWQ keep the float weight and quantize it on the fly from `weight_scale` /
    `weight_zero_point`; GPTQ has already written the dequantized values into `weight`.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = module.quantization_scheme.weights
    return fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, args)


def assert_group_levels(model, bits: int, group_size: int) -> None:
    """Per output row and input group, the dequantized weights take at most 2**bits values."""
    for name, module in decoder_linears(model).items():
        w = effective_weight(module).detach()
        rows, cols = w.shape
        groups = w.reshape(rows, cols // group_size, group_size)
        distinct = max(len(torch.unique(g)) for g in groups.reshape(-1, group_size))
        assert distinct <= 2**bits, f"{name}: {distinct} distinct values in a group"
        assert module.weight_scale.shape == (rows, cols // group_size), name


@pytest.fixture(scope="module")
def gptq_model():
    lm = tiny128()
    before = {n: m.weight.detach().clone() for n, m in decoder_linears(lm.model).items()}
    before["parameter_count"] = parameter_count(lm.model)
    model, stats = GPTQ(bits=4, group_size="auto").quantize(lm.model, lm.tokenizer, calib_for(lm))
    return lm, model, stats, before


def test_gptq_w4a16_groups_have_at_most_16_levels(gptq_model):
    lm, model, stats, before = gptq_model
    assert model is lm.model  # in place
    assert stats["scheme"] == "W4A16" and stats["bits"] == 4 and stats["group_size"] == 128
    assert stats["seconds"] > 0 and stats["calibration_samples"] == len(TEXTS)
    assert_group_levels(model, bits=4, group_size=128)
    assert parameter_count(model) == before["parameter_count"]  # scales are not parameters
    for name, module in decoder_linears(model).items():
        # GPTQ stores the dequantized weights themselves (fake-quantizing them is the identity)
        assert torch.equal(effective_weight(module), module.weight), name
        assert not torch.equal(module.weight, before[name]), name
    assert not hasattr(model.lm_head, "weight_scale")  # ignored
    # llm-compressor's sequential-pipeline offloading wrappers are gone: a plain module again
    from compressed_tensors.offload import OffloadCache

    assert not any(isinstance(m._parameters, OffloadCache) for m in model.modules())


def test_rtn_w4a16_groups_have_at_most_16_levels_without_calibration():
    lm = tiny128()
    quantizer = RTN(bits=4, group_size=64)
    model, stats = quantizer.quantize(lm.model, lm.tokenizer, None)
    assert (
        quantizer.bits == 4 and stats["group_size"] == 64 and stats["calibration_samples"] is None
    )
    assert_group_levels(model, bits=4, group_size=64)


def test_smoothquant_w8a8_runs_and_changes_weights():
    lm = tiny128()
    before = {n: m.weight.detach().clone() for n, m in decoder_linears(lm.model).items()}
    quantizer = SmoothQuant()
    model, stats = quantizer.quantize(lm.model, lm.tokenizer, calib_for(lm))
    assert quantizer.bits == 8 and stats["scheme"] == "W8A8" and stats["activation_bits"] == 8
    changed = [n for n, m in decoder_linears(model).items() if not torch.equal(m.weight, before[n])]
    assert changed  # smoothing folded scales into the projections after the norms
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.quantization_scheme.input_activations.num_bits == 8
    with torch.no_grad():
        assert torch.isfinite(model(calib_for(lm).input_ids[:2]).logits).all()


def test_awq_runs_on_cpu():
    lm = tiny128()
    model, stats = AWQ(n_grid=4).quantize(lm.model, lm.tokenizer, calib_for(lm))
    assert stats["scheme"] == "W4A16_ASYM" and stats["group_size"] == 128
    assert_group_levels(model, bits=4, group_size=128)
    with torch.no_grad():
        assert torch.isfinite(model(calib_for(lm).input_ids[:2]).logits).all()


def test_group_size_auto_fits_smollm2_widths():
    # SmolLM2-135M's widths: hidden 576 (= 9 * 64), intermediate 1536
    lm = build_random_model(
        num_layers=1,
        hidden_size=576,
        intermediate_size=1536,
        num_heads=9,
        num_kv_heads=3,
        device="cpu",
    )
    assert resolve_group_size(lm.model, "auto") == 64
    assert resolve_group_size(lm.model, 32) == 32
    assert resolve_group_size(lm.model, None) is None
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=576"):
        resolve_group_size(lm.model, 128)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GPTQ(bits=3), "bits=3 is not supported"),
        (lambda: GPTQ(bits=4, scheme="W4A8"), "unknown scheme 'W4A8'"),
        (lambda: GPTQ(bits=4, scheme="fp4"), "unknown scheme 'fp4'"),
        (lambda: GPTQ(bits=8, scheme="W4A16"), "contradicts bits=8"),
        (lambda: RTN(bits=2), "bits=2 is not supported"),
        (lambda: AWQ(bits=3), "bits=3 is not supported"),
        (lambda: SmoothQuant(bits=4), "bits=4 is not supported"),
        (lambda: SmoothQuant(weight_method="awq"), "weight_method='awq'"),
        (lambda: SmoothQuant(smoothing_strength=1.5), "smoothing_strength"),
        (lambda: GPTQ(actorder="random"), "actorder"),
    ],
)
def test_bad_quantizer_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_at_quantize_time_raise():
    lm = tiny128()
    for quantizer in (GPTQ(), AWQ(), SmoothQuant()):
        with pytest.raises(ValueError, match="needs calibration data"):
            quantizer.quantize(lm.model, lm.tokenizer, None)
    with pytest.raises(ValueError, match="group_size=96 does not divide in_features=128"):
        RTN(group_size=96).quantize(lm.model, lm.tokenizer, None)
    with pytest.raises(ValueError, match="group_size='big'"):
        RTN(group_size="big")
    with pytest.raises(ValueError, match="group_size=0"):
        GPTQ(group_size=0)


def test_no_quant_is_identity():
    lm = tiny128()
    model, stats = NoQuant().quantize(lm.model, lm.tokenizer, None)
    assert model is lm.model and NoQuant.bits == 16 and stats["bits"] == 16


def test_paper_ratio_matches_table1():
    rows = [r for r in csv.DictReader(PAPER_RESULTS.open()) if r["table"] == "table1"]
    totals = {r["model"]: int(r["retained_layers"]) for r in rows if r["quantizer"] == "none"}
    quantized = [r for r in rows if r["quantizer"] != "none"]
    assert len(quantized) >= 12
    for r in quantized:
        # The paper counts every Table 1 quantizer, SmoothQuant W8A8 included, as int4 (Q = 4).
        ours = paper_compression_ratio(totals[r["model"]], int(r["retained_layers"]), bits=4)
        assert round(100 * ours, 2) == round(100 * float(r["compression_ratio"]), 2), r
    assert paper_compression_ratio(32, 18, 4) == 0.859375
    assert paper_compression_ratio(32, 24, 16) == 0.25  # no quantization: the layer ratio
    with pytest.raises(ValueError):
        paper_compression_ratio(32, 33, 4)


def test_parameter_count_and_zero_fraction():
    lm = tiny128()
    model = lm.model
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert parameter_count(model) == sum(distinct.values())
    assert zero_fraction(model) == 0.0
    linears = decoder_linears(model)
    total = sum(m.weight.numel() for m in linears.values())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()  # not a decoder Linear: not counted
    assert zero_fraction(model) == pytest.approx(128 * 256 / total)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_save_reload_plain_model(tmp_path):
    lm = tiny128()
    ids = calib_for(lm).input_ids[:2]
    nbytes = save_compressed(lm.model, lm.tokenizer, tmp_path)
    assert nbytes == sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), logits(lm.model, ids), atol=1e-5, rtol=0)


def test_save_reload_gptq_model_compressed(gptq_model, tmp_path):
    lm, model, _, _ = gptq_model
    ids = calib_for(lm).input_ids[:2]
    expected = logits(model, ids)
    nbytes = save_compressed(model, lm.tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    plain = tmp_path.parent / "plain"
    assert nbytes < save_compressed(tiny128().model, None, plain)  # int4 packed beats fp32
    # saving left the model as it was: float weights, no offloading wrappers, same logits
    from compressed_tensors.offload import OffloadCache

    assert not any(isinstance(m._parameters, OffloadCache) for m in model.modules())
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(logits(model, ids), expected)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    again = tmp_path.parent / "again"
    assert save_compressed(model, lm.tokenizer, again) == nbytes  # a second save is the same
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(again), ids), expected, atol=1e-5, rtol=0
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
@pytest.mark.parametrize("name, cls", [("bnb_int8", BnbInt8), ("bnb_nf4", BnbNF4)])
def test_bnb_configs_on_cpu_raise_clear_error(name, cls):
    message = rf"quant={name}: bitsandbytes needs a CUDA GPU"
    with pytest.raises(RuntimeError, match=message):
        cls()
    # Through Hydra (as the pipeline builds it, before loading any model): Hydra wraps it.
    cfg = OmegaConf.load(REPO / "conf" / "quant" / f"{name}.yaml")
    with pytest.raises(Exception, match=message) as info:
        instantiate(cfg)
    assert isinstance(info.value.__cause__ or info.value, RuntimeError)


@pytest.mark.parametrize("name", ["none", "gptq", "rtn", "awq", "smoothquant"])
def test_quant_configs_instantiate(name):
    quantizer = instantiate(OmegaConf.load(REPO / "conf" / "quant" / f"{name}.yaml"))
    assert quantizer.bits == {"none": 16, "smoothquant": 8}.get(name, 4)
    assert callable(quantizer.quantize)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, bits", [("bnb_int8", 8), ("bnb_nf4", 4)])
def test_bnb_quantizes_on_gpu(name, bits):
    import bitsandbytes as bnb

    lm = build_random_model(
        num_layers=2, hidden_size=128, intermediate_size=256, device="cuda", dtype="float16"
    )
    ids = calib_for(lm).input_ids[:2].cuda()
    expected = logits(lm.model, ids).float()
    quantizer = instantiate(OmegaConf.load(REPO / "conf" / "quant" / f"{name}.yaml"))
    model, stats = quantizer.quantize(lm.model, lm.tokenizer, None)
    assert quantizer.bits == bits and stats["bits"] == bits and stats["scheme"] == name
    layer = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(model.model.layers[0].mlp.down_proj, layer)
    got = logits(model, ids).float()
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9
