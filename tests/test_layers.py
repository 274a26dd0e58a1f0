"""Layer surgery on tiny in-process models of every supported family (fast tier, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mka_exp.layers import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    decoder_layers,
    final_hidden_states,
    hooks_removed_after,
    merge_layers,
    merge_params,
    num_layers,
    remove_layers,
    swapped_layers,
    trimmed_batch,
    with_hidden_input,
)

S, F = "sliding_attention", "full_attention"
# An irregular pattern so that slicing layer_types by the wrong positions shows.
MIXED_TYPES = [S, F, S, S, F, F]
BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=128,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)
# sliding_window=4 is shorter than prompt + generated tokens, so sliding layers really slide.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),
    "qwen3": dict(use_sliding_window=True, sliding_window=4, layer_types=MIXED_TYPES),
    "gemma2": dict(sliding_window=4, query_pre_attn_scalar=16, layer_types=MIXED_TYPES),
    "gemma3_text": dict(sliding_window=4, query_pre_attn_scalar=16, layer_types=MIXED_TYPES),
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1, sliding_window=4),
    # layer 0 dense, the rest sparse: layers 2 and 3 have the same structure, so they can merge
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=32, mlp_only_layers=[0]),
    "qwen3_moe": dict(MOE, mlp_only_layers=[0]),
}
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 63, 8]])


def build(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    config = AutoConfig.for_model(model_type, **{**BASE, **FAMILIES[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # perturb every tensor so no two layers share a value (norms too)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT, use_cache=False).logits


def layer_snapshot(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in decoder_layers(model)[index].state_dict().items()}


def reload(model: nn.Module, path) -> nn.Module:
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def generate(model: nn.Module, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            PROMPT,
            attention_mask=torch.ones_like(PROMPT),
            max_new_tokens=5,
            do_sample=False,
            use_cache=use_cache,
        )


def reference(model_type: str, source: nn.Module, retained: list[int], **config) -> nn.Module:
    """A model built directly with the retained layers' config and weights (not via layers.py)."""
    ref = build(model_type, seed=1, num_hidden_layers=len(retained), **config)
    state = {}
    for key, value in source.state_dict().items():
        head, sep, rest = key.partition("layers.")
        if not sep:
            state[key] = value
            continue
        index, _, tail = rest.partition(".")
        if int(index) in retained:
            state[f"{head}layers.{retained.index(int(index))}.{tail}"] = value
    ref.load_state_dict(state, strict=True)
    return ref


def reference_config(model_type: str, config, retained: list[int]) -> dict:
    """What the pruned config must say, written out by hand per family."""
    expected: dict = {}
    if model_type not in ("llama", "mistral", "mixtral", "qwen3_moe"):  # these have no layer_types
        expected["layer_types"] = [config.layer_types[i] for i in retained]
    if model_type == "qwen2":  # layers >= 3 slide, so retained [0, 2, 4, 5] -> F F S S
        expected["max_window_layers"] = 2
    if model_type in ("qwen2_moe", "qwen3_moe"):
        expected["mlp_only_layers"] = [0]
    return expected


def assert_consistent(model: nn.Module, n: int) -> None:
    config = model.config.get_text_config(decoder=True)
    assert num_layers(model) == n == config.num_hidden_layers
    for i, layer in enumerate(decoder_layers(model)):
        indices = {m.layer_idx for m in layer.modules() if "layer_idx" in vars(m)}
        assert indices == {i}
        attn_type = getattr(layer.self_attn, "layer_type", None)
        if attn_type is not None:
            assert attn_type == config.layer_types[i]
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == n
    config.validate()  # transformers' own checks (layer_types length ...)


# --------------------------------------------------------------------------- removal


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_remove_layers_keeps_a_valid_model(model_type: str, tmp_path) -> None:
    model = build(model_type)
    old_config = model.config
    types_before = list(getattr(old_config, "layer_types", None) or [])
    retained = [0, 2, 4, 5]
    originals = [decoder_layers(model)[i] for i in retained]
    expected_config = reference_config(model_type, old_config, retained)

    remove_layers(model, [1, 3])

    assert_consistent(model, 4)
    assert list(decoder_layers(model)) == originals  # the same module objects, in order
    for name, value in expected_config.items():
        assert getattr(model.config, name) == value, name
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in retained]
    assert torch.equal(generate(model, use_cache=True), generate(model, use_cache=False))
    ref = reference(model_type, model, list(range(4)), **expected_config)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-6)
    reloaded = reload(model, tmp_path)
    assert_consistent(reloaded, 4)
    assert torch.equal(logits(reloaded), logits(model))


def test_remove_layers_reference_from_unpruned_weights() -> None:
    # Independent of remove_layers' own bookkeeping: slice the original state dict by hand.
    model = build("gemma3_text")
    ref = reference(
        "gemma3_text", model, [0, 2, 4, 5], layer_types=[MIXED_TYPES[i] for i in (0, 2, 4, 5)]
    )
    remove_layers(model, [1, 3])
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-6)


def test_indices_are_current_positions_and_empty_is_noop() -> None:
    model = build("llama")
    layers = list(decoder_layers(model))
    remove_layers(model, [])
    assert list(decoder_layers(model)) == layers
    remove_layers(model, [0])
    remove_layers(model, [0])
    assert list(decoder_layers(model)) == layers[2:]
    assert_consistent(model, 4)


def test_sparse_step_becomes_explicit_dense_list(tmp_path) -> None:
    # decoder_sparse_step=2: layers 1, 3, 5 sparse. Keep [0, 2, 4, 5] -> dense, dense, dense, sparse.
    model = build("qwen2_moe", mlp_only_layers=[], decoder_sparse_step=2)
    remove_layers(model, [1, 3])
    assert model.config.decoder_sparse_step == 1
    assert model.config.mlp_only_layers == [0, 1, 2]
    reloaded = reload(model, tmp_path)
    assert torch.equal(logits(reloaded), logits(model))
    with pytest.raises(ValueError, match="different parameters"):
        merge_layers(model, keep=2, drop=3, lam=0.5)  # dense and sparse layers cannot merge


def test_cached_stack_flags_match_a_rebuilt_model(tmp_path) -> None:
    # qwen2 with max_window_layers=3: F F F S S S. Dropping 3..5 leaves no sliding layer.
    model = build("qwen2")
    assert model.model.has_sliding_layers
    remove_layers(model, [3, 4, 5])
    assert model.config.layer_types == [F, F, F]
    assert model.config.max_window_layers == 3
    reloaded = reload(model, tmp_path)
    assert model.model.has_sliding_layers is reloaded.model.has_sliding_layers is False
    assert torch.equal(logits(reloaded), logits(model))


def test_device_map_entries_follow_their_layers() -> None:
    model = build("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.1": 0, "model.layers.2": 1}
    model.hf_device_map.update({"model.layers.3.mlp": 1, "lm_head": 1})
    remove_layers(model, [1])
    assert model.hf_device_map == {
        "model.embed_tokens": 0,
        "model.layers.1": 1,
        "model.layers.2.mlp": 1,
        "lm_head": 1,
    }


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_merge_layers_blends_every_parameter(model_type: str, tmp_path) -> None:
    model = build(model_type)
    old2, old3 = layer_snapshot(model, 2), layer_snapshot(model, 3)
    pruned = build(model_type)
    remove_layers(pruned, [3])

    merge_layers(model, keep=2, drop=3, lam=0.3)

    assert_consistent(model, 5)
    new2 = decoder_layers(model)[2].state_dict()
    assert new2.keys() == old2.keys()
    for name, value in new2.items():
        assert torch.equal(value, 0.3 * old2[name] + 0.7 * old3[name]), name
        assert not torch.equal(value, old2[name]), name  # norms merged too (scope "all")
    assert not torch.allclose(logits(model), logits(pruned), atol=1e-4)
    assert torch.equal(generate(model, use_cache=True), generate(model, use_cache=False))
    reloaded = reload(model, tmp_path)
    assert torch.equal(logits(reloaded), logits(model))


def test_merge_with_drop_before_keep_lands_at_keep_minus_one() -> None:
    model = build("qwen3")
    old1, old3 = layer_snapshot(model, 1), layer_snapshot(model, 3)
    merge_layers(model, keep=3, drop=1, lam=0.75)
    for name, value in decoder_layers(model)[2].state_dict().items():
        assert torch.equal(value, 0.75 * old3[name] + 0.25 * old1[name]), name
    assert model.config.layer_types == [MIXED_TYPES[i] for i in (0, 2, 3, 4, 5)]
    assert_consistent(model, 5)


@pytest.mark.parametrize("model_type", ["gemma3_text", "mixtral"])
def test_linear_scope_leaves_norms_untouched(model_type: str) -> None:
    model = build(model_type)
    old2, old3 = layer_snapshot(model, 2), layer_snapshot(model, 3)
    merge_layers(model, keep=2, drop=3, lam=0.3, scope="linear")
    new2 = decoder_layers(model)[2].state_dict()
    norms = [name for name in new2 if "norm" in name]
    linear = [name for name in new2 if name not in norms]
    assert norms and linear
    for name in norms:
        assert torch.equal(new2[name], old2[name]), name
    for name in linear:  # attention/MLP projections, and fused experts + router for mixtral
        assert torch.equal(new2[name], 0.3 * old2[name] + 0.7 * old3[name]), name


def test_merge_params_computes_in_float32_and_casts_back() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8).to(torch.bfloat16)
    weight_a, weight_b = a.weight.detach().clone(), b.weight.detach().clone()
    merge_params(a, b, lam=0.3)
    expected = (0.3 * weight_a.float() + 0.7 * weight_b.float()).to(torch.bfloat16)
    assert a.weight.dtype == torch.bfloat16
    assert torch.equal(a.weight, expected)
    assert torch.equal(b.weight, weight_b)  # b is only read


def test_merge_params_refuses_mismatched_modules_without_changing_anything() -> None:
    a, b = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(ValueError, match="different parameters"):
        merge_params(a, b, lam=0.5)
    with pytest.raises(ValueError, match="shape"):
        merge_params(nn.Linear(4, 4), nn.Linear(4, 3), lam=0.5)
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())


def test_merge_params_edges_of_lambda() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    weight_b = b.weight.detach().clone()
    merge_params(a, b, lam=0)
    assert torch.equal(a.weight, weight_b)


# --------------------------------------------------------------------------- gemma3 multimodal


def test_gemma3_multimodal_text_stack(tmp_path) -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**BASE, **FAMILIES["gemma3_text"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(vision, image_size=28, patch_size=14),
        mm_tokens_per_image=1,
        image_token_index=5,
        boi_token_index=6,
        eoi_token_index=7,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    assert decoder_layers(model) is model.model.language_model.layers
    old1, old2 = layer_snapshot(model, 1), layer_snapshot(model, 2)
    remove_layers(model, [4])
    merge_layers(model, keep=1, drop=2, lam=0.5)
    assert_consistent(model, 4)
    assert model.config.text_config.layer_types == [S, F, S, F]  # [S, F, S, S, F] minus 2
    for name, value in decoder_layers(model)[1].state_dict().items():
        assert torch.equal(value, 0.5 * old1[name] + 0.5 * old2[name]), name
    model.save_pretrained(tmp_path)
    reloaded = Gemma3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded), logits(model))


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return build("llama")


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([6], r"layer index 6 is out of range; allowed range 0\.\.5"),
        ([-1], r"layer index -1 is out of range"),
        ([1, 1], r"layer index 1 is given twice"),
        (list(range(6)), r"cannot remove all 6"),
        ([True], r"not a layer index"),
        (["2"], r"not an integer"),
    ],
)
def test_remove_layers_rejects_bad_indices(llama, indices, message) -> None:
    before = list(decoder_layers(llama))
    with pytest.raises(ValueError, match=message):
        remove_layers(llama, indices)
    assert list(decoder_layers(llama)) == before
    assert llama.config.num_hidden_layers == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep=2, drop=3, lam=1.5), r"lam must be in \[0, 1\], got 1\.5"),
        (dict(keep=2, drop=3, lam=-0.1), r"lam must be in \[0, 1\]"),
        (dict(keep=2, drop=3, lam=math.nan), r"lam must be in \[0, 1\]"),
        (dict(keep=2, drop=3, lam=0.5, scope="norms"), r"unknown merge scope 'norms'.*'linear'"),
        (dict(keep=2, drop=2, lam=0.5), r"cannot merge with itself"),
        (dict(keep=2, drop=9, lam=0.5), r"drop 9 is out of range; allowed range 0\.\.5"),
    ],
)
def test_merge_layers_rejects_bad_input(llama, kwargs, message) -> None:
    before = layer_snapshot(llama, 2)
    with pytest.raises(ValueError, match=message):
        merge_layers(llama, **kwargs)
    assert num_layers(llama) == 6
    assert all(torch.equal(v, before[k]) for k, v in decoder_layers(llama)[2].state_dict().items())


def test_unsupported_architecture_is_named() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    for call in (
        lambda: decoder_layers(model),
        lambda: num_layers(model),
        lambda: remove_layers(model, [0]),
        lambda: merge_layers(model, 0, 1, 0.5),
    ):
        with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama") as info:
            call()
        assert isinstance(info.value, ValueError)
    assert len(model.transformer.h) == 2
    assert set(FAMILIES) <= set(SUPPORTED_MODEL_TYPES)


def test_swapped_layers_restore_the_originals_even_on_error(tiny):
    layers = list(decoder_layers(tiny.model))
    with pytest.raises(RuntimeError, match="boom"), swapped_layers(tiny.model, {1: None}):
        assert decoder_layers(tiny.model)[1] is not layers[1]
        raise RuntimeError("boom")
    assert list(decoder_layers(tiny.model)) == layers


def test_with_hidden_input_replaces_the_positional_or_keyword_hidden_states() -> None:
    old, new = torch.zeros(1, 2, 3, dtype=torch.float16), torch.ones(1, 2, 3)
    args, kwargs = with_hidden_input((old, "mask"), {"cache": None}, new)
    assert args[1:] == ("mask",) and kwargs == {"cache": None}
    assert args[0].dtype == torch.float16 and bool((args[0] == 1).all())  # the layer's dtype
    args, kwargs = with_hidden_input((), {"hidden_states": old, "cache": None}, new)
    assert args == () and kwargs["cache"] is None and bool((kwargs["hidden_states"] == 1).all())


def test_hooks_removed_after_even_on_error(llama) -> None:
    layer, calls = decoder_layers(llama)[0], []
    handle = layer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(RuntimeError, match="boom"), hooks_removed_after([handle]):
        raise RuntimeError("boom")
    llama(input_ids=torch.tensor([[3, 4, 5]]))
    assert calls == []


def test_trimmed_batch_drops_the_columns_that_are_pad_in_every_row() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    batch = {"input_ids": torch.arange(8).view(2, 4), "attention_mask": mask}
    trimmed = trimmed_batch(batch, "cpu")
    assert trimmed["input_ids"].tolist() == [[0, 1, 2], [4, 5, 6]]
    assert trimmed["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_final_hidden_states_are_what_the_lm_head_reads(llama) -> None:
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        hidden = final_hidden_states(llama, {"input_ids": ids})
        logits = llama(input_ids=ids).logits
    torch.testing.assert_close(llama.get_output_embeddings()(hidden), logits)
