"""LaCo: RDSC merges follow the formula (not dropping), top-down search, threshold, fallback."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from mka_exp import pipeline
from mka_exp.calibration import tokenize
from mka_exp.layers import decoder_layers, num_layers, swapped_layers
from mka_exp.methods import laco
from mka_exp.methods.laco import LaCo, rdsc_merge
from mka_exp.models.toy import build_random_model
from tests.helpers import compose_config

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: is the sky blue? Answer: yes",
    "A. B. C. D. and then some more letters",
    "true false true false, and so on for a while",
]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calib_of(tok):
    return tokenize(TEXTS, tok, max_length=32, name="t", batch_size=4)


def model_of(layers=6, seed=0):
    return build_random_model("llama", num_layers=layers, hidden_size=64, device="cpu", seed=seed)


def params(layer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.named_parameters()}


def make_identity(model, index):
    layer = decoder_layers(model)[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_merge_follows_the_rdsc_formula_and_differs_from_dropping():
    lm = model_of(6)
    calib = calib_of(lm.tokenizer)
    before = [params(layer) for layer in decoder_layers(lm.model)]
    stats = LaCo(num_layers=2, m=2, threshold=-1.0).compress(lm.model, calib)
    # Top-down: the first candidate merges the last two layers (4, 5) into layer 3; accepted.
    assert stats["merges"] == [
        {
            "keep": 3,
            "merged": [4, 5],
            "similarity": stats["merges"][0]["similarity"],
            "accepted": True,
        }
    ]
    assert stats["removed_layers"] == [4, 5] and num_layers(lm.model) == 4
    merged = params(decoder_layers(lm.model)[3])
    for name, value in merged.items():
        base = before[3][name]
        if name.rsplit(".", 2)[-2] in LINEAR:
            expected = base + (before[4][name] - base) + (before[5][name] - base)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
            assert not torch.allclose(value, base), f"{name}: the merge must not be a drop"
        else:  # norms stay layer 3's
            assert torch.equal(value, base), name
    for index in (0, 1, 2):  # untouched layers
        for name, value in params(decoder_layers(lm.model)[index]).items():
            assert torch.equal(value, before[index][name])


def test_rdsc_merge_leaves_its_inputs_unchanged():
    layers = decoder_layers(model_of(3).model)
    before = [params(layer) for layer in layers]
    merged = rdsc_merge(layers[0], [layers[1], layers[2]])
    assert merged is not layers[0]
    for layer, saved in zip(layers, before, strict=True):
        for name, value in params(layer).items():
            assert torch.equal(value, saved[name])


def test_top_down_search_accepts_the_first_merge_above_threshold():
    """Layer 1 is an identity: merging 2 into it gives layer 2's weights, the model is exactly
    the dense one (cosine 1), so the first merge from the top that reaches 0.99999 is (1, 2)."""
    lm = model_of(6)
    make_identity(lm.model, 1)
    stats = LaCo(num_layers=1, m=1, threshold=0.99999).compress(lm.model, calib_of(lm.tokenizer))
    assert [c[0] for c in stats["candidates"]] == [4, 3, 2, 1]  # from the top down
    assert all(c[2] < 0.99999 for c in stats["candidates"][:3])
    (merge,) = stats["merges"]
    assert merge["keep"] == 1 and merge["merged"] == [2] and merge["accepted"] is True
    assert merge["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert stats["fallback_merges"] == 0


def test_partial_last_merge_reaches_any_target():
    lm = model_of(6)
    stats = LaCo(num_layers=3, m=2, threshold=-1.0, min_interval=1).compress(
        lm.model, calib_of(lm.tokenizer)
    )
    assert [len(m["merged"]) for m in stats["merges"]] == [2, 1]
    assert num_layers(lm.model) == 3 and len(stats["removed_layers"]) == 3


def test_fallback_takes_the_most_similar_merge_and_is_recorded(caplog, monkeypatch):
    lm = model_of(5)
    calib = calib_of(lm.tokenizer)
    strict = copy.deepcopy(lm.model)
    passes, starts = [], []
    full, part = laco.final_states, laco.final_states_from
    monkeypatch.setattr(laco, "final_states", lambda *a: passes.append(len(a[1])) or full(*a))
    monkeypatch.setattr(
        laco,
        "final_states_from",
        lambda m, b, s: starts.append((len(b[0][0]["input_ids"]), s)) or part(m, b, s),
    )
    with caplog.at_level(logging.WARNING):
        stats = LaCo(num_layers=1, m=1, threshold=1.0, num_prompts=3).compress(lm.model, calib)
    # One full pass (dense, on the first 3 prompts), then the candidates 3, 2, 1, 0 from their
    # first layer up on those prompts; the fallback reuses their scores instead of scoring again.
    assert passes == [3] and starts == [(3, 3), (3, 2), (3, 1), (3, 0)]
    (merge,) = stats["merges"]
    assert merge["accepted"] is False and stats["fallback_merges"] == 1
    best = max(stats["candidates"], key=lambda c: c[2])  # every start was tried top-down
    assert merge["keep"] == best[0] and merge["similarity"] == pytest.approx(best[2])
    assert "no merge reaches threshold" in caplog.text
    with pytest.raises(RuntimeError, match="lower the threshold or set method.fallback=true"):
        LaCo(num_layers=1, m=1, threshold=1.0, fallback=False).compress(strict, calib)


def test_a_candidate_scored_from_the_kept_layer_inputs_equals_a_full_pass():
    """A candidate runs only its own layers and those above, from the inputs the unchanged
    layers below gave in one full pass; its final states equal a full pass of the merged model
    (prompts of different lengths, so padded batches)."""
    lm = model_of(6)
    calib = calib_of(lm.tokenizer)
    _, kept = laco.final_states(lm.model, calib, None)
    layers = decoder_layers(lm.model)
    for start in range(5):
        merged = rdsc_merge(layers[start], [layers[start + 1]])
        with swapped_layers(lm.model, {start: merged, start + 1: None}):
            full, _ = laco.final_states(lm.model, calib, None)
            fast = laco.final_states_from(lm.model, kept, start)
        assert fast.shape == full.shape
        torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
        assert not torch.allclose(full, laco.final_states(lm.model, calib, None)[0])  # merged


def test_m_must_be_smaller_than_the_layer_count(tiny):
    with pytest.raises(ValueError, match="method.m=4 must be smaller than the model's 4 layers"):
        LaCo(num_layers=1, m=4).compress(tiny.model, calib_of(tiny.tokenizer))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.threshold=1.5", r"method.threshold=1.5 is outside \[-1, 1\]"),
        ("method.threshold=-2", r"method.threshold=-2 is outside \[-1, 1\]"),
        ("method.m=0", "method.m=0 must be an integer >= 1"),
        ("method.min_interval=0", "method.min_interval=0 must be an integer >= 1"),
    ],
)
def test_bad_laco_options_fail_before_the_model_loads(
    override, message, tmp_path, data_root, monkeypatch
):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pipeline, "load_session", no_load)
    cfg = compose_config(["method=laco", override], tmp_path, data_root)
    with pytest.raises(Exception, match=message):
        pipeline.run(cfg)
