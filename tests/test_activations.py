"""One-pass capture of every layer's hidden states: shapes, padding, one pass, cache."""

from __future__ import annotations

import pytest
import torch

from mka_exp import activations
from mka_exp.activations import (
    activation_key,
    capture_hidden_states,
    num_points,
    select_token_positions,
    token_cosine,
)
from mka_exp.calibration import tokenize
from mka_exp.layers import decoder_layers

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: is the sky blue? Answer: yes",
    "A. B. C. D.",
    "true false true false, and so on for a while longer than the others",
    "0123456789",
]


def calib_of(tok, texts=TEXTS, batch_size=2):
    return tokenize(list(texts), tok, max_length=32, name="t", batch_size=batch_size)


def count_layer_calls(model) -> tuple[list[int], list]:
    calls = [0] * len(decoder_layers(model))

    def counter(i):
        def hook(*_):
            calls[i] += 1

        return hook

    handles = [
        layer.register_forward_hook(counter(i)) for i, layer in enumerate(decoder_layers(model))
    ]
    return calls, handles


@pytest.mark.parametrize("representation", ["tokens", "last", "mean"])
def test_shapes(tiny, representation):
    calib = calib_of(tiny.tokenizer)
    states = capture_hidden_states(tiny.model, calib, representation, max_points=20)
    n = num_points(calib, representation, 20)
    assert n == (20 if representation == "tokens" else len(TEXTS))
    assert states.shape == (5, n, 64)
    assert states.dtype == torch.float32 and states.device.type == "cpu"


def test_one_forward_pass_per_batch(tiny):
    calib = calib_of(tiny.tokenizer, batch_size=2)  # 5 prompts -> 3 batches
    calls, handles = count_layer_calls(tiny.model)
    norm_calls = []
    handles.append(tiny.model.model.norm.register_forward_hook(lambda *_: norm_calls.append(1)))
    capture_hidden_states(tiny.model, calib, "tokens")
    for handle in handles:
        handle.remove()
    assert calls == [3, 3, 3, 3]
    assert norm_calls == []  # the pass stops after the last decoder layer


def test_matches_hf_hidden_states_but_last_is_raw(tiny):
    """Index i is HF's hidden_states[i]; the last is the raw output (HF's has the final norm)."""
    calib = calib_of(tiny.tokenizer, texts=TEXTS[:1])
    ours = capture_hidden_states(tiny.model, calib, "tokens")
    with torch.no_grad():
        hf = tiny.model(**next(calib.batches()), output_hidden_states=True).hidden_states
    for i in range(4):
        torch.testing.assert_close(ours[i], hf[i][0])
    torch.testing.assert_close(tiny.model.model.norm(ours[4]), hf[4][0])
    assert not torch.allclose(ours[4], hf[4][0])


@pytest.mark.parametrize("representation", ["last", "mean", "tokens"])
def test_padding_is_excluded(tiny, representation):
    alone = calib_of(tiny.tokenizer, texts=TEXTS[2:3])
    padded = calib_of(tiny.tokenizer, texts=[TEXTS[2], TEXTS[3]])  # the short one gets padding
    assert padded.attention_mask[0].sum() < padded.attention_mask.shape[1]
    a = capture_hidden_states(tiny.model, alone, representation)
    b = capture_hidden_states(tiny.model, padded, representation)
    rows = a.shape[1]  # tokens: the first prompt's tokens come first
    torch.testing.assert_close(b[:, :rows], a, atol=1e-5, rtol=1e-5)
    # alone in its batch, the padded prompt's all-pad columns are trimmed: same points
    single = capture_hidden_states(tiny.model, padded, representation, batch_size=1)
    torch.testing.assert_close(single, b, atol=1e-5, rtol=1e-5)


def test_token_sample_is_seeded_and_non_pad():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    picks = select_token_positions(mask, 4, seed=0)
    assert len(picks) == 4 and len(set(map(tuple, picks.tolist()))) == 4
    assert all(mask[r, c] == 1 for r, c in picks.tolist())
    assert picks.tolist() == sorted(picks.tolist())
    assert torch.equal(picks, select_token_positions(mask, 4, seed=0))
    assert len(select_token_positions(mask, 100, seed=0)) == 9


def test_cache_hit_needs_no_forward_pass(tiny, tmp_path):
    calib = calib_of(tiny.tokenizer)
    first = capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    calls, handles = count_layer_calls(tiny.model)
    second = capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    for handle in handles:
        handle.remove()
    assert calls == [0, 0, 0, 0]
    assert torch.equal(first, second)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob(".*tmp"))


class _Killed(Exception):
    pass


def _kill_after(model, batches: int) -> list:
    """A hook that raises once layer 0 has run `batches` times: a capture killed partway."""
    seen = [0]

    def hook(*_):
        seen[0] += 1
        if seen[0] > batches:
            raise _Killed

    return [decoder_layers(model)[0].register_forward_pre_hook(hook)]


@pytest.mark.parametrize("representation", ["tokens", "mean"])
def test_a_killed_capture_resumes_where_it_stopped(tiny, tmp_path, monkeypatch, representation):
    """At repair scale a capture is hours: with a cache it keeps its progress (here after every
    batch), so a rerun runs only the batches left and returns the same tensor as one pass."""
    monkeypatch.setattr(activations, "CHECKPOINT_SECONDS", 0.0)
    calib = calib_of(tiny.tokenizer, batch_size=1)  # 5 batches
    whole = capture_hidden_states(tiny.model, calib, representation, max_points=11)
    handles = _kill_after(tiny.model, 3)
    with pytest.raises(_Killed):
        capture_hidden_states(tiny.model, calib, representation, max_points=11, cache=tmp_path)
    for handle in handles:
        handle.remove()
    assert len(list(tmp_path.glob("*.partial.pt"))) == 1
    calls, handles = count_layer_calls(tiny.model)
    resumed = capture_hidden_states(
        tiny.model, calib, representation, max_points=11, cache=tmp_path
    )
    for handle in handles:
        handle.remove()
    assert calls == [2, 2, 2, 2]  # batches 4 and 5 only
    assert torch.equal(resumed, whole)
    assert not list(tmp_path.glob("*.partial.pt"))  # the finished capture replaced it


def test_a_damaged_or_foreign_partial_capture_is_started_over(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(activations, "CHECKPOINT_SECONDS", 0.0)
    calib = calib_of(tiny.tokenizer, batch_size=1)
    whole = capture_hidden_states(tiny.model, calib, "tokens")
    handles = _kill_after(tiny.model, 2)
    with pytest.raises(_Killed):
        capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    for handle in handles:
        handle.remove()
    (partial,) = tmp_path.glob("*.partial.pt")
    entry = torch.load(partial, weights_only=True)
    entry["tensor"][0, 0, 0] += 1.0  # the checksum no longer matches
    torch.save(entry, partial)
    calls, handles = count_layer_calls(tiny.model)
    again = capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    for handle in handles:
        handle.remove()
    assert calls == [5, 5, 5, 5] and torch.equal(again, whole)


def test_cache_key_changes_with_weights_and_settings(tiny, tmp_path):
    calib = calib_of(tiny.tokenizer)
    key = activation_key(tiny.model, calib, "tokens", 2048, 0)
    assert key != activation_key(tiny.model, calib, "mean", 2048, 0)
    assert key != activation_key(tiny.model, calib, "tokens", 16, 0)
    capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    with torch.no_grad():
        decoder_layers(tiny.model)[1].mlp.down_proj.weight[0, 0] += 1.0
    assert activation_key(tiny.model, calib, "tokens", 2048, 0) != key
    capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_bad_representation(tiny):
    with pytest.raises(ValueError, match="representation 'cls'"):
        capture_hidden_states(tiny.model, calib_of(tiny.tokenizer), "cls")


def test_token_cosine():
    states = torch.randn(4, 7, 8)
    states[2] = 3 * states[1]  # same direction
    cos = token_cosine(states, gap=1)
    assert cos.shape == (3, 7)
    torch.testing.assert_close(cos[1], torch.ones(7, dtype=torch.float64))
    assert token_cosine(states, gap=3).shape == (1, 7)
    with pytest.raises(ValueError, match="gap=4"):
        token_cosine(states, gap=4)
