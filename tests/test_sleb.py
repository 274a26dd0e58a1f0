"""SLEB: greedy removal by calibration perplexity, rescored after each removal, nested."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from mka_exp import pipeline
from mka_exp.calibration import CalibrationSet, tokenize
from mka_exp.layers import decoder_layers, swapped_layers
from mka_exp.methods import sleb
from mka_exp.methods.sleb import SLEB, calibration_nll, removal_perplexities
from mka_exp.models.toy import build_random_model
from mka_exp.results import records
from tests.helpers import compose_config
from tests.test_faults import damage, warnings_of
from tests.test_layers import build

TEXTS = [
    f"Sentence {i}: the {w} fox jumps over {i * 7} lazy dogs, then asks whether the sky is blue."
    for i, w in enumerate(["quick", "slow", "red", "tired", "small", "big"] * 2)
]


def calib_of(tok):
    return tokenize(TEXTS, tok, max_length=48, name="t", batch_size=4)


def trained_with_identity(identity: int, layers: int = 5):
    """A tiny Llama trained a little on the calibration text, with layer `identity` an identity
    (no attention or MLP write, frozen): every other layer now lowers the perplexity."""
    lm = build_random_model("llama", num_layers=layers, hidden_size=64, device="cpu", seed=1)
    model = lm.model
    planted = decoder_layers(model)[identity]
    with torch.no_grad():
        planted.self_attn.o_proj.weight.zero_()
        planted.mlp.down_proj.weight.zero_()
    planted.self_attn.o_proj.weight.requires_grad_(False)
    planted.mlp.down_proj.weight.requires_grad_(False)
    calib = calib_of(lm.tokenizer)
    labels = calib.input_ids.masked_fill(~calib.attention_mask.bool(), -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        loss = model(
            input_ids=calib.input_ids, attention_mask=calib.attention_mask, labels=labels
        ).loss
        loss.backward()
        optimizer.step()
    model.eval()
    return lm, calib


def test_sleb_removes_planted_identity_block_first():
    lm, calib = trained_with_identity(identity=2)
    stats = SLEB(num_layers=2).compress(lm.model, calib)
    assert stats["removal_order"][0] == 2
    first = dict(stats["steps"][0]["candidates"])
    assert first[2] == pytest.approx(stats["dense_perplexity"], rel=1e-5)
    assert min(v for k, v in first.items() if k != 2) > first[2] * 1.01
    # Rescored on the model without layer 2: candidates are the four remaining layers.
    assert [layer for layer, _ in stats["steps"][1]["candidates"]] == [0, 1, 3, 4]
    assert stats["removed_layers"] == sorted(stats["removal_order"])


def test_sleb_is_nested_and_progressive_equals_compress():
    lm, calib = trained_with_identity(identity=1, layers=5)
    fresh = copy.deepcopy(lm.model)
    points = list(SLEB(num_layers=1).progressive(lm.model, calib, [1, 3]))
    single = SLEB(num_layers=3).compress(fresh, calib)
    assert points[-1][1]["removal_order"] == single["removal_order"]
    assert points[0][1]["removal_order"] == single["removal_order"][:1]
    assert len(decoder_layers(lm.model)) == 2


def padded_ids(rows: int = 5, width: int = 12) -> CalibrationSet:
    """Random prompts of different lengths, right-padded (vocabulary of test_layers' models)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (rows, width), generator=generator)
    lengths = torch.tensor([width, 7, width - 2, 5, 9][:rows])
    mask = (torch.arange(width) < lengths[:, None]).long()
    return CalibrationSet("ids", [""] * rows, ids * mask, mask, batch_size=2)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "qwen3_moe"])
def test_removal_perplexities_equal_one_full_pass_per_candidate(model_type):
    """The bottom-up walk (layers below a candidate run once per step) scores every candidate
    exactly as removing it and running the whole model: sliding windows, softcapping, MoE,
    padding and several batches included."""
    model, calib = build(model_type), padded_ids()
    naive = []
    for position in range(len(decoder_layers(model))):
        with swapped_layers(model, {position: None}):
            naive.append(math.exp(calibration_nll(model, calib)))
    walked = removal_perplexities(model, calib)
    assert walked == pytest.approx(naive, rel=1e-6, abs=0)
    assert len(set(walked)) == len(walked)  # the candidates really differ


def test_calibration_nll_is_the_mean_token_cross_entropy(tiny):
    calib = calib_of(tiny.tokenizer)
    with torch.no_grad():
        logits = tiny.model(input_ids=calib.input_ids, attention_mask=calib.attention_mask).logits
    mask = calib.attention_mask.bool()
    valid = mask[:, 1:] & mask[:, :-1]
    expected = F.cross_entropy(logits[:, :-1][valid], calib.input_ids[:, 1:][valid])
    assert calibration_nll(tiny.model, calib, batch_size=3) == pytest.approx(float(expected), 1e-5)
    assert math.isfinite(calibration_nll(tiny.model, calib))


def test_sleb_asked_for_more_layers_than_the_model_has(tiny):
    with pytest.raises(
        ValueError, match=r"method.num_layers=4 is outside the allowed range \[1, 3\]"
    ):
        SLEB(num_layers=4).compress(tiny.model, calib_of(tiny.tokenizer))
    with pytest.raises(ValueError, match="method.batch_size=0"):
        SLEB(num_layers=1, batch_size=0)


def test_sleb_curve_points_equal_single_runs(tmp_path, data_root):
    shrink = ["method=sleb", "eval.tasks=[piqa]", "eval.limit=4", "calib.per_subject=1"]
    pipeline.run(compose_config([*shrink, "curve=[0.25,0.5]"], tmp_path / "curve", data_root))
    for ratio in (0.25, 0.5):
        single = pipeline.run(
            compose_config([*shrink, f"method.ratio={ratio}"], tmp_path / "single", data_root)
        )
        point = records.load_record(tmp_path / "curve", single["config_hash"])
        assert point["method_stats"]["removal_order"] == single["method_stats"]["removal_order"]
        assert point["metrics"] == pytest.approx(single["metrics"], abs=1e-6)


def test_sleb_cache_replays_the_search_and_a_longer_one_continues_it(tmp_path, monkeypatch):
    lm, calib = trained_with_identity(identity=2)
    models = [copy.deepcopy(lm.model) for _ in range(3)]
    first = SLEB(num_layers=2, cache=str(tmp_path)).compress(lm.model, calib)
    assert len(list(tmp_path.glob("sleb_*.pt"))) == 2  # one entry per removal step
    uncached_three = SLEB(num_layers=3).compress(models[2], calib)
    calls = []
    scored = sleb.removal_perplexities
    monkeypatch.setattr(sleb, "removal_perplexities", lambda *a: calls.append(1) or scored(*a))
    replayed = SLEB(num_layers=2, cache=str(tmp_path)).compress(models[0], calib)
    assert calls == []  # replayed: no candidate scored
    assert [step.pop("from_cache") for step in replayed["steps"]] == [True, True]
    assert [step.pop("from_cache") for step in first["steps"]] == [False, False]
    assert replayed == first
    for mine, theirs in zip(models[0].parameters(), lm.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    longer = SLEB(num_layers=3, cache=str(tmp_path)).compress(models[1], calib)
    assert calls == [1]  # only the third step was scored
    assert [step.pop("from_cache") for step in longer["steps"]] == [True, True, False]
    for step in uncached_three["steps"]:
        step.pop("from_cache")
    assert longer == uncached_three


def test_damaged_sleb_cache_is_named_deleted_and_scored_again(tmp_path, caplog):
    lm, calib = trained_with_identity(identity=1, layers=4)
    fresh = copy.deepcopy(lm.model)
    first = SLEB(num_layers=1, cache=str(tmp_path)).compress(lm.model, calib)
    (path,) = tmp_path.glob("sleb_*.pt")
    damage(path, "truncated")
    with caplog.at_level(logging.WARNING):
        again = SLEB(num_layers=1, cache=str(tmp_path)).compress(fresh, calib)
    assert again == first and not again["steps"][0]["from_cache"]
    (warning,) = warnings_of(caplog)
    assert str(path) in warning


def test_seeded_cache_replays_a_finished_search_without_scoring(tmp_path, monkeypatch):
    lm, calib = trained_with_identity(identity=2)
    fresh, again = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    first = SLEB(num_layers=3).compress(lm.model, calib)
    paths = SLEB(num_layers=3, cache=str(tmp_path)).seed_cache(fresh, calib, first["steps"])
    assert sorted(paths) == sorted(tmp_path.glob("sleb_*.pt")) and len(paths) == 3
    for mine, theirs in zip(fresh.parameters(), lm.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)  # seeding cut the model as the search did
    monkeypatch.setattr(sleb, "removal_perplexities", lambda *a: pytest.fail("scored again"))
    replayed = SLEB(num_layers=3, cache=str(tmp_path)).compress(again, calib)
    assert [step.pop("from_cache") for step in replayed["steps"]] == [True] * 3
    for step in first["steps"]:
        step.pop("from_cache")
    assert replayed == first


def test_seeding_from_another_models_steps_is_refused(tmp_path):
    lm, calib = trained_with_identity(identity=2)
    steps = SLEB(num_layers=2).compress(copy.deepcopy(lm.model), calib)["steps"]
    steps[1]["candidates"] = steps[1]["candidates"][:-1]  # a step of a model with one layer fewer
    with pytest.raises(ValueError, match="step 2 scores layers .* the record is of another model"):
        SLEB(num_layers=2, cache=str(tmp_path)).seed_cache(lm.model, calib, steps)
    with pytest.raises(ValueError, match="method.cache=null"):
        SLEB(num_layers=2).seed_cache(lm.model, calib, steps)


def test_seed_cache_from_a_record_lets_another_run_replay_its_search(
    tmp_path, data_root, monkeypatch
):
    from mka_exp import seed_cache

    cache = tmp_path / "cache"
    shrink = ["method=sleb", "method.ratio=0.5", "eval.tasks=[piqa]", "calib.per_subject=1"]
    first = pipeline.run(compose_config([*shrink, f"paths.cache_dir={cache}"], tmp_path, data_root))
    (record,) = (tmp_path / "records").glob("*.json")
    for entry in cache.glob("sleb_*.pt"):  # a new checkout: the records, not the cache
        entry.unlink()
    seed_cache.main([str(record)])
    assert len(list(cache.glob("sleb_*.pt"))) == 2
    monkeypatch.setattr(sleb, "removal_perplexities", lambda *a: pytest.fail("scored again"))
    overrides = [*shrink, f"paths.cache_dir={cache}", "repair=linear"]
    second = pipeline.run(compose_config(overrides, tmp_path / "second", data_root))
    assert [s["from_cache"] for s in second["method_stats"]["steps"]] == [True, True]
    assert second["method_stats"]["removal_order"] == first["method_stats"]["removal_order"]
    other = tmp_path / "shortgpt.json"
    method = {"_target_": "mka_exp.methods.shortgpt.ShortGPT"}
    other.write_text(json.dumps({"method": "shortgpt", "config": {"method": method}}))
    with pytest.raises(ValueError, match="method 'shortgpt' is not sleb"):
        seed_cache.main([str(other)])


# --------------------------------------------------------------------------- search_tokens


def test_search_subset_takes_the_fewest_evenly_spaced_prompts_holding_the_tokens():
    calib = padded_ids(rows=5)  # prompt lengths 12, 7, 10, 5, 9 (43 tokens)
    assert sleb.search_subset(calib, None) is calib
    assert sleb.search_subset(calib, 43) is calib
    two = sleb.search_subset(calib, 20)  # m = 1: [0] 12 tokens; m = 2: [0, 4] 21 tokens
    assert torch.equal(two.input_ids, calib.input_ids[[0, 4]])
    assert int(two.attention_mask.sum()) == 21 and two.batch_size == calib.batch_size
    three = sleb.search_subset(calib, 22)  # m = 3: [0, 2, 4] 31 tokens
    assert torch.equal(three.attention_mask, calib.attention_mask[[0, 2, 4]])


def test_search_tokens_scores_on_the_subset_and_says_so(tmp_path):
    """The search with `search_tokens` removes what a search on those prompts alone removes; the
    record names the prompts and tokens it read, and the cache is of that subset."""
    lm, calib = trained_with_identity(identity=2)
    subset = sleb.search_subset(calib, 60)
    assert 1 < len(subset) < len(calib)
    fresh = copy.deepcopy(lm.model)
    got = SLEB(num_layers=2, search_tokens=60, cache=str(tmp_path)).compress(lm.model, calib)
    want = SLEB(num_layers=2).compress(fresh, subset)
    assert got["removal_order"] == want["removal_order"]
    assert got["dense_perplexity"] == pytest.approx(want["dense_perplexity"], rel=1e-6)
    assert got["search_prompts"] == len(subset)
    assert got["search_tokens"] == int(subset.attention_mask.sum()) >= 60
    assert "search_tokens" not in want  # null: the record as before the key


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True])
def test_bad_search_tokens_is_one_line_naming_the_key(value):
    with pytest.raises(ValueError, match=r"method.search_tokens=.*: allowed null .* or an integer"):
        SLEB(num_layers=1, search_tokens=value)


def test_null_search_tokens_keeps_the_hash_of_records_written_before_the_key(tmp_path, data_root):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(
        compose_config(["method=sleb", "method.num_layers=2"], tmp_path, data_root), resolve=True
    )
    assert cfg["method"]["search_tokens"] is None
    before = copy.deepcopy(cfg)
    del before["method"]["search_tokens"]
    assert records.config_hash(cfg) == records.config_hash(before)
    cfg["method"]["search_tokens"] = 5000
    assert records.config_hash(cfg) != records.config_hash(before)
