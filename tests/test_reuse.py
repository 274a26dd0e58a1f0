"""Reuse across models (issue 29): a variant that starts from the reference's cached hidden
states gives the answers it gives on its own, and never starts from a different model's."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mka_exp.evaluation.prefix_cache import PrefixCacheHFLM
from mka_exp.evaluation.reuse import Reuse, fingerprints, forward_from, layer_inputs
from mka_exp.evaluation.reuse_store import Key, Store
from mka_exp.layers import merge_layers, remove_layers
from mka_exp.models.loading import LoadedModel
from mka_exp.models.toy import build_random_model, train_tokenizer
from tests.test_prefix_cache import assert_same_answers, few_shot_requests

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3_text"]


def build(model_type: str, layers: int = 4) -> LoadedModel:
    """Random model; Qwen2 with non-zero biases, Gemma3 with 8-token sliding windows on the
    even layers (shorter than the prompts)."""
    if model_type == "gemma3_text":
        tokenizer = train_tokenizer()
        types = ["sliding_attention", "full_attention"] * (layers // 2)
        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            sliding_window=8, layer_types=types, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        return LoadedModel(model, tokenizer, "gemma3_sliding")
    loaded = build_random_model(model_type, num_layers=layers, hidden_size=64, device="cpu")
    if model_type == "qwen2":
        gen = torch.Generator().manual_seed(1)
        for name, param in loaded.model.named_parameters():
            if name.endswith("bias"):
                param.data = torch.randn(param.shape, generator=gen) * 0.5
    return loaded


@torch.no_grad()
@pytest.mark.parametrize("model_type", FAMILIES)
def test_forward_from_equals_full_forward(model_type):
    """Left-padded rows with offset position ids (as the prefix cache runs them)."""
    model = build(model_type).model
    ids = torch.randint(10, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = (torch.arange(20) - torch.tensor([[0], [5]])).clamp(min=0)
    settings = dict(attention_mask=mask, position_ids=positions)
    with layer_inputs(model, [2]) as seen:
        want = model(ids, **settings).logits
    got = forward_from(model, 2, seen[2], **settings).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 5:], want[1, 5:], rtol=1e-5, atol=1e-5)
    assert model.config.num_hidden_layers == 4  # the view is undone
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


def lm(loaded, store=None, layers=(2,)):
    reuse = Reuse(loaded.model, store, list(layers)) if store is not None else None
    return PrefixCacheHFLM(
        pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4, min_shared=8,
        reuse=reuse,
    )  # fmt: skip


def evaluate(loaded, reqs, store=None, layers=(2,)):
    scorer = lm(loaded, store, layers)
    return scorer._loglikelihood_tokens(reqs, disable_tqdm=True), scorer.stats


def merged(loaded: LoadedModel) -> LoadedModel:
    """Layers 2 and 3 merged: layers 0 and 1 are the reference's."""
    variant = copy.deepcopy(loaded)
    merge_layers(variant.model, keep=2, drop=3, lam=0.5)
    return variant


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merged_variant_starts_from_reference(model_type, tmp_path):
    ref = build(model_type)
    reqs = few_shot_requests(ref.model)
    store = Store(tmp_path, 10**8)
    want_ref, stats = evaluate(ref, reqs, store)
    assert stats["reuse_start"] == 0 and store.written > 0
    variant = merged(ref)
    alone, alone_stats = evaluate(variant, reqs)
    got, got_stats = evaluate(variant, reqs, Store(tmp_path, 10**8))
    assert got_stats["reuse_start"] == 2
    assert_same_answers(got, alone)
    assert (
        got_stats["layer_tokens"] == got_stats["run_tokens"] == alone_stats["run_tokens"]
    )  # 1 of 3 layers
    again, _ = evaluate(ref, reqs, Store(tmp_path, 10**8))  # the reference itself, from layer 2
    assert_same_answers(again, want_ref)


def test_changed_layer_below_does_not_reuse(tmp_path):
    ref = build("llama")
    reqs = few_shot_requests(ref.model)
    evaluate(ref, reqs, Store(tmp_path, 10**8))
    variant = merged(ref)
    with torch.no_grad():
        variant.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # a "repaired" layer 1
    alone, _ = evaluate(variant, reqs)
    got, stats = evaluate(variant, reqs, Store(tmp_path, 10**8))
    assert stats["reuse_start"] == 0
    assert_same_answers(got, alone)


def test_fingerprints_see_what_shapes_the_bottom():
    ref = build("llama").model
    prints = fingerprints(ref, 4)
    variant = copy.deepcopy(ref)
    remove_layers(variant, [3])
    assert fingerprints(variant, 3) == prints[:4]  # fewer layers above: the same bottom
    variant.config.rope_theta = 1.0  # a rotary change reaches layer 0's input... via the config
    variant.config.rms_norm_eps = 1e-3
    assert fingerprints(variant, 3)[1] != prints[1]
    half = copy.deepcopy(ref).to(torch.bfloat16)
    assert fingerprints(half, 1)[0] != prints[0]


def test_store_smaller_than_an_entry_stores_nothing(tmp_path):
    ref = build("llama")
    reqs = few_shot_requests(ref.model)
    store = Store(tmp_path, 100)
    want, _ = evaluate(ref, reqs, store)
    assert store.written == 0 and not list(tmp_path.glob("*/*"))
    got, stats = evaluate(merged(ref), reqs, Store(tmp_path, 100))
    assert stats["reuse_start"] == 0


def test_damaged_entry_is_recomputed_not_used(tmp_path):
    ref = build("qwen3")
    reqs = few_shot_requests(ref.model)
    evaluate(ref, reqs, Store(tmp_path, 10**8))
    victim = sorted(tmp_path.glob("*/*.bin"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    variant = merged(ref)
    alone, _ = evaluate(variant, reqs)
    got, stats = evaluate(variant, reqs, Store(tmp_path, 10**8))
    assert stats["reuse_start"] == 0  # the call started from layer 2, met the damage, reran
    assert_same_answers(got, alone)


def test_store_checks_keys_and_evicts_least_recently_used(tmp_path):
    store = Store(tmp_path, 2500)
    keys = [Key("f", str(i), 1) for i in range(4)]
    tensor = torch.arange(200, dtype=torch.float32)  # 974 bytes an entry: two fit
    assert store.put(keys[0], tensor) > 0
    assert store.put(keys[0], tensor) == 0  # already there
    torch.testing.assert_close(store.get(keys[0]), tensor)
    foreign = store.path(keys[1])
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(store.path(keys[0]).read_bytes())  # another key's file under this name
    assert store.get(keys[1]) is None
    foreign.unlink()
    old = store.path(keys[0])
    os.utime(old, (1, 1))  # least recently used
    store.put(keys[1], tensor)
    store.put(keys[2], tensor)
    assert not old.exists() and store.get(keys[2]) is not None
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*")) <= 2500


def backend_rows(model, tokenizer, data_root, **reuse):
    from mka_exp.evaluation.hf import HFEvaluation

    backend = HFEvaluation(
        tasks=["mmlu_anatomy", "piqa", "hellaswag"], limit=3, data_root=data_root,
        num_fewshot={"mmlu_anatomy": 2}, batch_size=4, **reuse,
    )  # fmt: skip
    metrics, rows = backend.evaluate(model, tokenizer)
    return metrics, rows, backend.last_lm.stats


def test_backend_rows_equal_with_and_without_reuse(tmp_path, data_root):
    """Whole evaluations: the dense reference stores, a merged variant starts at layer 2; its
    per-example predictions are identical and its log-likelihoods equal to float tolerance."""
    ref = build("llama")
    on = dict(reuse=str(tmp_path / "reuse"), reuse_layers=2)
    backend_rows(ref.model, ref.tokenizer, data_root, **on)
    variant = merged(ref)
    want, want_rows, _ = backend_rows(variant.model, variant.tokenizer, data_root)
    got, got_rows, stats = backend_rows(variant.model, variant.tokenizer, data_root, **on)
    assert stats["reuse_start"] == 2
    assert got == pytest.approx(want, abs=1e-9)
    assert got_rows["pred"].tolist() == want_rows["pred"].tolist()
    for a, b in zip(got_rows["choice_ll"], want_rows["choice_ll"], strict=True):
        assert list(a) == pytest.approx(list(b), abs=1e-4)


def test_reuse_settings_checked_and_never_hashed(tmp_path, data_root):
    from omegaconf import OmegaConf

    from mka_exp.checks import ConfigError
    from mka_exp.preflight import check_config
    from mka_exp.results import records as results
    from tests.helpers import compose_config

    bad = ["eval.reuse=true", "eval.reuse_layers=0", "eval.reuse_bytes=0"]
    with pytest.raises(ConfigError) as err:
        check_config(compose_config(bad, tmp_path, data_root))
    assert [p.split(":")[0] for p in err.value.problems] == [
        "eval.reuse=True", "eval.reuse_layers=0", "eval.reuse_bytes=0",
    ]  # fmt: skip
    good = compose_config([], tmp_path, data_root)
    other = compose_config(
        [f"eval.reuse={tmp_path}/r", "eval.reuse_layers=[2,3]", "eval.reuse_bytes=99"],
        tmp_path, data_root,
    )  # fmt: skip
    check_config(other)
    hashes = {results.config_hash(OmegaConf.to_container(c, resolve=True)) for c in (good, other)}
    assert len(hashes) == 1
