"""The CUDA paths: bf16 capture, MKA merges and layer surgery on the device, device_map loading,
lm-eval on a GPU model. Run by `pytest -m gpu` (benchmarks/gpu_check.sh on the device machine);
skipped without CUDA."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mka_exp.activations import capture_hidden_states
from mka_exp.calibration import tokenize
from mka_exp.layers import decoder_layers, merge_layers, remove_layers
from mka_exp.methods.mka import MKA
from mka_exp.models.loading import load_pretrained
from mka_exp.models.toy import build_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: is the sky blue? Answer: yes",
    "A. B. C. D. and then some more words for a longer prompt",
    "true false true false, and so on for a while longer than the others",
    "0123456789",
    "yes no true false the of and to in is was for on that with as by at from",
]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def six_layers():
    """A float32 6-layer Llama on the CPU (copy it to the GPU for a CPU/GPU comparison)."""
    return build_random_model(
        num_layers=6, hidden_size=128, intermediate_size=256, num_heads=4, device="cpu"
    )


def calib_of(tokenizer):
    return tokenize(TEXTS, tokenizer, max_length=32, name="t", batch_size=2)


def linear_weights(layer) -> dict[str, torch.Tensor]:
    return {
        name: module.weight
        for name, module in layer.named_modules()
        if name.rpartition(".")[2] in LINEARS
    }


def placement(model) -> set[tuple[str, torch.dtype]]:
    return {(p.device.type, p.dtype) for p in model.parameters()}


def test_bf16_capture_on_cuda_matches_float32_cpu():
    lm = six_layers()
    gpu = copy.deepcopy(lm.model).to("cuda", torch.bfloat16)
    calib = calib_of(lm.tokenizer)
    expected = capture_hidden_states(lm.model, calib, "tokens", max_points=64)
    got = capture_hidden_states(gpu, calib, "tokens", max_points=64)
    assert got.shape == expected.shape == (7, 64, 128)
    assert got.dtype == torch.float32 and got.device.type == "cpu"  # as on the CPU path
    cosine = F.cosine_similarity(got.double(), expected.double(), dim=-1)
    assert cosine.min() > 0.98  # same token positions, bf16 rounding only


def test_mka_compress_on_cuda_bf16_matches_cpu_merges():
    lm = six_layers()
    gpu = copy.deepcopy(lm.model).to("cuda", torch.bfloat16)
    calib = calib_of(lm.tokenizer)
    cpu_stats = MKA(num_layers=2, max_points=64).compress(lm.model, calib)
    method = MKA(num_layers=2, max_points=64)
    gpu_stats = method.compress(gpu, calib)
    assert gpu_stats["removed_layers"] == cpu_stats["removed_layers"]
    for mine, theirs in zip(gpu_stats["merges"], cpu_stats["merges"], strict=True):
        assert (mine["keep"], mine["drop"]) == (theirs["keep"], theirs["drop"])
        assert mine["lam"] == pytest.approx(theirs["lam"], abs=0.05)
    assert len(decoder_layers(gpu)) == gpu.config.num_hidden_layers == 4
    assert placement(gpu) == {("cuda", torch.bfloat16)}
    assert method.artifacts["similarity_before"].shape == (6, 6)


def test_merge_on_cuda_writes_the_bf16_blend():
    lm = six_layers()
    model = lm.model.to("cuda", torch.bfloat16)
    layers = decoder_layers(model)
    a = {k: v.detach().clone() for k, v in linear_weights(layers[2]).items()}
    b = {k: v.detach().clone() for k, v in linear_weights(layers[3]).items()}
    merge_layers(model, keep=2, drop=3, lam=0.6, scope="linear")
    merged = linear_weights(decoder_layers(model)[2])
    assert merged.keys() == a.keys() and len(merged) == 7
    for name, weight in merged.items():
        blend = (0.6 * a[name].float() + 0.4 * b[name].float()).to(torch.bfloat16)
        assert torch.equal(weight, blend), name  # float32 arithmetic, one rounding
    assert len(decoder_layers(model)) == 5 and placement(model) == {("cuda", torch.bfloat16)}


def test_generate_with_cache_agrees_after_surgery_on_cuda():
    lm = six_layers()
    model = lm.model.to("cuda")  # float32: greedy tokens must match exactly
    merge_layers(model, keep=1, drop=2, lam=0.5)
    remove_layers(model, [0, 3])
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1, 2]
    prompt = torch.randint(4, len(lm.tokenizer), (3, 9), generator=torch.Generator().manual_seed(0))
    prompt = prompt.cuda()

    def generate(use_cache: bool) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=lm.tokenizer.pad_token_id,
            )

    cached = generate(True)
    assert cached.shape == (3, 21) and cached.device.type == "cuda"
    assert torch.equal(cached, generate(False))


def test_device_map_auto_loads_on_cuda_and_captures(tmp_path, monkeypatch):
    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path / "cache"))  # the folder's seals
    lm = six_layers()
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_pretrained(str(tmp_path), dtype="bfloat16", device_map="auto")
    assert placement(loaded.model) == {("cuda", torch.bfloat16)}
    states = capture_hidden_states(loaded.model, calib_of(loaded.tokenizer), max_points=32)
    assert states.shape == (7, 32, 128) and bool(torch.isfinite(states).all())
    remove_layers(loaded.model, [5])
    with torch.no_grad():
        ids = calib_of(loaded.tokenizer).input_ids[:2].cuda()
        assert torch.isfinite(loaded.model(ids).logits.float()).all()


def piqa_root() -> Path | None:
    """The offline mirror beside the repo, else the rows the device check carries."""
    for root in (REPO.parent / "shared" / "benchmarks", REPO / ".gpu_wheels" / "data"):
        if (root / "baber" / "piqa").is_dir():
            return root
    return None


def test_lm_eval_on_cuda_shared_prefix_equals_hflm():
    from mka_exp.evaluation.hf import evaluate

    root = piqa_root()
    if root is None:
        pytest.fail("no piqa rows: put the mirror at ../shared/benchmarks or .gpu_wheels/data")
    lm = six_layers()
    model = lm.model.to("cuda")
    kwargs = {"limit": 8, "batch_size": 4, "data_root": str(root)}
    plain = evaluate(model, lm.tokenizer, ["piqa"], share_prefix=False, **kwargs)
    shared = evaluate(model, lm.tokenizer, ["piqa"], share_prefix=True, **kwargs)
    assert 0.0 <= plain["piqa/acc"] <= 1.0
    assert shared == pytest.approx(plain, abs=1e-9)


def test_vllm_backend_scores_like_hflm():
    """`eval=vllm` on a saved copy of the model: the same examples, accuracies close to HFLM's
    (another engine's kernels, so not bit-equal), and the in-memory model back on its GPU."""
    import importlib.util

    from mka_exp.evaluation.hf import HFEvaluation
    from mka_exp.evaluation.vllm import VLLMEvaluation

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install vllm)")
    root = piqa_root()
    if root is None:
        pytest.fail("no piqa rows: put the mirror at ../shared/benchmarks or .gpu_wheels/data")
    lm = six_layers()
    model = lm.model.to("cuda")
    settings = {"tasks": ["piqa"], "limit": 16, "data_root": str(root)}
    hf_metrics, hf_rows = HFEvaluation(**settings, batch_size=4).evaluate(model, lm.tokenizer)
    backend = VLLMEvaluation(
        **settings, dtype="float32", gpu_memory_utilization=0.5, max_model_len=512
    )
    metrics, rows = backend.evaluate(model, lm.tokenizer)
    assert rows["doc_id"].tolist() == hf_rows["doc_id"].tolist()
    assert metrics["piqa/acc"] == pytest.approx(hf_metrics["piqa/acc"], abs=0.13)  # <= 2 of 16
    assert next(model.parameters()).device.type == "cuda"
