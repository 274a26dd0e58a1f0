"""Layer methods: ShortGPT, angular distance and MKA pick, remove and merge the right layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mka_exp.calibration import tokenize
from mka_exp.layers import decoder_layers, num_layers
from mka_exp.methods.angular import Angular, blocks_are_nested
from mka_exp.methods.mka import MKA, choose_pair, drop_layer, merge_ratio
from mka_exp.methods.reverse_prune import ReversePrune
from mka_exp.methods.shortgpt import ShortGPT
from mka_exp.models.toy import build_random_model
from mka_exp.results.plots import similarity_heatmap

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: is the sky blue? Answer: yes",
    "A. B. C. D. and then some more letters",
    "true false true false, and so on for a while",
    "0123456789 is a list of digits",
    "yes no yes no, the answer was no",
]

# A hand-made similarity: best adjacent pair (1, 2), best pair overall (0, 2).
S = torch.tensor(
    [
        [1.0, 0.2, 0.9, 0.1],
        [0.2, 1.0, 0.7, 0.4],
        [0.9, 0.7, 1.0, 0.5],
        [0.1, 0.4, 0.5, 1.0],
    ]
)


def calib_of(tok, texts=TEXTS):
    return tokenize(list(texts), tok, max_length=32, name="t", batch_size=4)


def model_of(layers=6):
    return build_random_model("llama", num_layers=layers, hidden_size=64, device="cpu").model


def make_identity(model, index):
    """Zero the layer's residual writes: its output equals its input."""
    layer = decoder_layers(model)[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- baselines


def test_shortgpt_removes_planted_identity_layer(tiny):
    make_identity(tiny.model, 2)
    stats = ShortGPT(num_layers=1).compress(tiny.model, calib_of(tiny.tokenizer))
    assert stats["removed_layers"] == [2]
    assert stats["block_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert min(b for i, b in enumerate(stats["block_influence"]) if i != 2) > 1e-4


@pytest.mark.parametrize("representation", ["last", "tokens"])
def test_angular_removes_planted_identity_block(representation):
    model = model_of(6)
    for index in (2, 3, 4):
        make_identity(model, index)
    tok = build_random_model("llama", num_layers=1, device="cpu").tokenizer
    stats = Angular(num_layers=3, representation=representation).compress(model, calib_of(tok))
    assert stats["removed_layers"] == [2, 3, 4] and stats["block_start"] == 2
    assert len(stats["angular_distance"]) == 4  # starts 0..3 for blocks of 3 in 6 layers
    assert stats["angular_distance"][2] == pytest.approx(0.0, abs=1e-4)


def test_angular_progressive_nested_and_not():
    assert blocks_are_nested([range(2, 3), range(2, 4), range(1, 4)])
    assert not blocks_are_nested([range(4, 5), range(0, 2)])
    model = model_of(6)
    for index in (3, 4):
        make_identity(model, index)
    tok = build_random_model("llama", num_layers=1, device="cpu").tokenizer
    points = list(
        Angular(num_layers=1, representation="tokens").progressive(model, calib_of(tok), [1, 2])
    )
    assert [p[1]["removed_layers"] for p in points] == [[3], [3, 4]]
    assert num_layers(model) == 4


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(
    "make",
    [
        lambda n: ShortGPT(num_layers=n),
        lambda n: Angular(num_layers=n),
        lambda n: MKA(num_layers=n),
        lambda n: MKA(num_layers=n, pairing="most_similar", similarity="recompute"),
        lambda n: MKA(num_layers=n, pairing="adjacent_back", lam="code", scope="linear"),
    ],
    ids=["shortgpt", "angular", "mka", "mka_most_similar_recompute", "mka_code"],
)
def test_each_method_removes_exactly_n(tiny, make, n):
    stats = make(n).compress(tiny.model, calib_of(tiny.tokenizer))
    assert num_layers(tiny.model) == 4 - n == tiny.model.config.num_hidden_layers
    assert len(stats["removed_layers"]) == n == len(set(stats["removed_layers"]))
    assert stats["removed_layers"] == sorted(stats["removed_layers"])
    with torch.no_grad():
        logits = tiny.model(**next(calib_of(tiny.tokenizer).batches())).logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- MKA merge


@pytest.mark.parametrize(
    ("pairing", "scope"),
    [
        ("adjacent_back", "all"),
        ("most_similar_adjacent", "all"),
        ("most_similar", "all"),
        ("most_similar_adjacent", "linear"),
    ],
)
def test_mka_merged_weights_follow_the_formula(tiny, pairing, scope):
    old = [weights(layer) for layer in decoder_layers(tiny.model)]
    method = MKA(num_layers=1, pairing=pairing, scope=scope, lam=0.3)
    stats = method.compress(tiny.model, calib_of(tiny.tokenizer))
    (merge,) = stats["merges"]
    keep, drop, lam = merge["keep"], merge["drop"], merge["lam"]
    assert keep < drop and stats["removed_layers"] == [drop] and lam == 0.3
    merged = weights(decoder_layers(tiny.model)[keep])
    for name, value in merged.items():
        linear = name.endswith("proj.weight")
        expected = lam * old[keep][name] + (1 - lam) * old[drop][name]
        expected = expected if linear or scope == "all" else old[keep][name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert set(method.artifacts) == {"similarity_before", "similarity_after"}
    assert method.artifacts["similarity_before"].shape == (4, 4)
    assert method.artifacts["similarity_after"].shape == (3, 3)


def test_mka_similarity_after_off_skips_the_capture_pass_and_merges_the_same(tiny):
    """The after-merge heatmap is a full capture pass (an hour on 200 k calibration tokens of the
    1.5B): `similarity_after=False` skips it, with the same merges and weights."""
    calib = calib_of(tiny.tokenizer)
    other = build_random_model("llama", num_layers=4, hidden_size=64, device="cpu").model
    other.load_state_dict(tiny.model.state_dict())
    on = MKA(num_layers=2, pairing="most_similar")
    off = MKA(num_layers=2, pairing="most_similar", similarity_after=False)
    captures = []
    real = MKA.similarity_matrix
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MKA, "similarity_matrix",
                      lambda self, *a: captures.append(self) or real(self, *a))  # fmt: skip
        stats_on, stats_off = on.compress(tiny.model, calib), off.compress(other, calib)
    assert captures.count(on) == 2 and captures.count(off) == 1
    assert stats_off["merges"] == stats_on["merges"] and set(off.artifacts) == {"similarity_before"}
    for a, b in zip(tiny.model.state_dict().values(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="similarity_after='no' must be true or false"):
        MKA(num_layers=1, similarity_after="no")


def test_mka_differs_from_pruning(tiny):
    calib = calib_of(tiny.tokenizer)
    pruned = build_random_model("llama", num_layers=4, hidden_size=64, device="cpu").model
    ReversePrune(num_layers=1).compress(pruned, calib)
    stats = MKA(num_layers=1, pairing="adjacent_back").compress(tiny.model, calib)
    assert stats["merges"][0]["keep"] == 2 and stats["removed_layers"] == [3]
    merged, kept = weights(decoder_layers(tiny.model)[2]), weights(decoder_layers(pruned)[2])
    assert not torch.allclose(merged["mlp.up_proj.weight"], kept["mlp.up_proj.weight"])
    with torch.no_grad():
        batch = next(calib.batches())
        assert not torch.allclose(tiny.model(**batch).logits, pruned(**batch).logits)


def test_choose_pair_on_hand_made_similarity():
    assert choose_pair(S, "adjacent_back") == (2, 3)
    assert choose_pair(S, "most_similar_adjacent") == (1, 2)
    assert choose_pair(S, "most_similar") == (0, 2)
    asymmetric = S.clone()
    asymmetric[2, 3], asymmetric[3, 2] = 1.0, 0.6  # mean 0.8 beats 0.7
    assert choose_pair(asymmetric, "most_similar_adjacent") == (2, 3)


def test_merge_ratio_rules_on_hand_made_similarity():
    assert merge_ratio(S, 1, 2, "paper") == pytest.approx(0.5)  # symmetric S
    asymmetric = S.clone()
    asymmetric[1, 2], asymmetric[2, 1] = 1.0, 0.0
    assert merge_ratio(asymmetric, 1, 2, "paper") == pytest.approx(math.e / (math.e + 1))
    mean_1, mean_2 = (0.2 + 1.0 + 0.7 + 0.4) / 4, (0.9 + 0.7 + 1.0 + 0.5) / 4
    r = mean_1 / (mean_1 + mean_2)
    assert merge_ratio(S, 1, 2, "code") == pytest.approx(1 / (1 + math.exp(-r)))
    assert merge_ratio(S, 1, 2, 0.25) == 0.25


def test_drop_layer_keeps_the_kept_row():
    assert torch.equal(drop_layer(S, 2), S[[0, 1, 3]][:, [0, 1, 3]])


# --------------------------------------------------------------------------- progressive


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ShortGPT(**kw),
        lambda **kw: MKA(similarity="once", max_points=64, **kw),
        lambda **kw: MKA(
            similarity="recompute", pairing="most_similar", lam="code", max_points=64, **kw
        ),
    ],
    ids=["shortgpt", "mka_once", "mka_recompute"],
)
def test_progressive_point_equals_fresh_compress(make):
    walked = model_of(5)
    tok = build_random_model("llama", num_layers=1, device="cpu").tokenizer
    calib = calib_of(tok)
    method = make(num_layers=1)
    assert method.nested
    points = {}
    for count, stats in method.progressive(walked, calib, [0, 1, 3]):
        points[count] = (weights(walked), stats)
    assert points[0][1]["removed_layers"] == []
    for count in (1, 3):
        fresh = model_of(5)
        stats = make(num_layers=count).compress(fresh, calib)
        assert stats == points[count][1]
        assert_same_weights(weights(fresh), points[count][0])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pairing": "random"}, "pairing 'random'"),
        ({"lam": "mean"}, "lam rule 'mean'"),
        ({"lam": 1.5}, "lam=1.5"),
        ({"similarity": "sometimes"}, "similarity mode 'sometimes'"),
        ({"representation": "cls"}, "representation 'cls'"),
        ({"scope": "norms"}, "merge scope 'norms'"),
        ({"bandwidth": 0}, "bandwidth=0"),
        ({"bandwidth": -8.0}, "bandwidth=-8.0"),
        ({"bandwidth": "mean"}, "bandwidth='mean'"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"max_points": 0}, "max_points=0"),
    ],
)
def test_mka_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MKA(ratio=0.25, **kwargs)


@pytest.mark.parametrize("cls", [ShortGPT, Angular])
def test_baselines_bad_representation(cls):
    with pytest.raises(ValueError, match="representation 'cls'"):
        cls(ratio=0.25, representation="cls")


@pytest.mark.parametrize("cls", [ShortGPT, Angular, MKA])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"ratio": 0.99}, "ratio=0.99 removes 4 of 4"), ({"num_layers": 4}, "num_layers=4")],
)
def test_counts_that_leave_no_layer(tiny, cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs).compress(tiny.model, calib_of(tiny.tokenizer))
    assert num_layers(tiny.model) == 4


@pytest.mark.parametrize("cls", [ShortGPT, Angular, MKA])
def test_ratio_or_num_layers_required_at_construction(cls):
    with pytest.raises(ValueError, match="exactly one of method.ratio or method.num_layers"):
        cls()


def test_embedding_dim_needs_more_points(tiny):
    calib = calib_of(tiny.tokenizer, TEXTS[:3])  # 3 points with representation=last
    with pytest.raises(ValueError, match="embedding_dim=3 must be smaller"):
        MKA(num_layers=1, representation="last", embedding_dim=3).compress(tiny.model, calib)


def test_progressive_counts_must_ascend(tiny):
    with pytest.raises(ValueError, match="ascending"):
        list(ShortGPT(num_layers=1).progressive(tiny.model, calib_of(tiny.tokenizer), [2, 1]))


def test_similarity_heatmap(tmp_path):
    path = similarity_heatmap(np.asarray(S), tmp_path / "sub" / "s.png", "similarity before")
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


def test_mka_cache_reuses_activations_and_similarity(tmp_path):
    tok = build_random_model("llama", num_layers=1, device="cpu").tokenizer
    calib = calib_of(tok)
    first = MKA(num_layers=2, cache=str(tmp_path)).compress(model_of(4), calib)
    assert len(list(tmp_path.glob("npib_*.pt"))) == 2  # dense model and merged model
    model = model_of(4)
    calls = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    second = MKA(num_layers=2, cache=str(tmp_path)).compress(model, calib)
    handle.remove()
    assert second == first and calls == []
