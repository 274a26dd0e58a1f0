"""The linear repair's stored dense states (`repair.reuse`): fits read the dense model's boundary
states from the store, or run it from the highest stored boundary below their cursor, and fold
the maps they fold without a store; a store of another model, or a damaged entry, is never used."""

from __future__ import annotations

import copy

import pytest
import torch

from mka_exp.layers import decoder_layers, remove_layers
from mka_exp.methods.reverse_prune import ReversePrune
from mka_exp.models.toy import build_random_model
from mka_exp.repair.dense_states import DenseStates, kept_boundaries
from mka_exp.repair.linear import LinearRepair
from mka_exp.results.records import config_hash
from mka_exp.state_store import Store
from tests.helpers import compose_config
from tests.test_repair import SHRINK, boundary_states, calib_of, split_calib

LAYERS = 8


def model(seed: int = 3):
    return build_random_model("llama", num_layers=LAYERS, hidden_size=64, device="cpu", seed=seed)


def repaired(lm, calib, cut: list[int], **reuse):
    """(down_proj weights after the repair, its stats) of `lm` copied, `cut` removed."""
    lm = copy.deepcopy(lm)
    repair = LinearRepair(ridge=0.5, max_tokens=None, batch_size=3, **reuse)
    dense = repair.prepare(lm.model, calib)
    remove_layers(lm.model, cut)
    stats = repair.repair(lm.model, calib, {"removed_layers": cut}, dense)
    return [layer.mlp.down_proj.weight.clone() for layer in decoder_layers(lm.model)], stats


def assert_same_fits(got, want) -> None:
    (weights, stats), (weights_want, stats_want) = got, want
    for ours, theirs in zip(weights, weights_want, strict=True):
        assert torch.equal(ours, theirs)
    for fit, fit_want in zip(stats["fits"], stats_want["fits"], strict=True):
        assert fit["residual_after"] == fit_want["residual_after"]
        assert fit.get("heldout_residual_after") == fit_want.get("heldout_residual_after")


def test_boundary_states_from_a_pass_a_store_and_a_stored_start(tmp_path):
    """Boundary b is the state entering layer b (b = n: the last layer's output), whether the
    pass runs from the embedding, is read back, or starts from a stored boundary."""
    lm = model()
    calib = calib_of(lm.tokenizer)
    batch = next(iter(calib.batches(None)))
    mask = batch["attention_mask"].bool()
    want = boundary_states(lm.model, calib)  # [n + 1] states of the whole set, full forwards
    tokens = int(mask.sum())  # the batch's rows come first in the whole set's tokens

    def check(states, cursor, end):
        fed, target = states.boundaries(batch, cursor, end)
        torch.testing.assert_close(fed[mask], want[cursor][:tokens], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target[mask], want[end][:tokens], rtol=1e-5, atol=1e-5)
        return fed, target

    plain = DenseStates(lm.model)
    first = check(plain, 3, LAYERS)
    assert plain.stats()["dense_layer_tokens"] == LAYERS * mask.numel()
    stored = DenseStates(lm.model, Store(tmp_path, 10**9), every=2)
    check(stored, 3, LAYERS)  # stores boundaries 2, 3, 4, 6, 8
    assert stored.stats()["dense_layer_tokens"] == LAYERS * mask.numel()
    again = DenseStates(lm.model, Store(tmp_path, 10**9), every=2)
    for got, want_ in zip(check(again, 3, LAYERS), first, strict=True):
        assert torch.equal(got, want_)  # read back, bit for bit
    check(again, 5, 7)  # 5 is not stored: runs layers 4..6 from boundary 4
    assert again.stats() == {
        "dense_layer_tokens": (7 - 4) * mask.numel(),
        "dense_entries_read": 2,
    }


@pytest.mark.parametrize("heldout", [False, True])
def test_fits_with_a_store_equal_fits_without_and_later_cuts_run_less(tmp_path, heldout):
    """Repaired runs on one store (as the cuts of a grid): the first stores every 2nd boundary
    while it fits, the second reads its target and runs the dense model from a stored boundary to
    its cut, the third reads both; all fold the maps of a run without a store. A rerun of the
    first reads every state and runs nothing."""
    lm = model()
    calib = split_calib(lm.tokenizer) if heldout else calib_of(lm.tokenizer)
    reuse = dict(reuse=str(tmp_path / "dense"), reuse_layers=2)
    first = repaired(lm, calib, [6, 7], **reuse)
    assert_same_fits(first, repaired(lm, calib, [6, 7]))
    full = first[1]["dense_layer_tokens"]
    assert full > 0 and first[1]["dense_entries_read"] == 0
    # cursor 3 is not stored, the target (boundary 8) is: layer 2 runs, from stored boundary 2
    second = repaired(lm, calib, [4, 5, 6, 7], **reuse)
    assert_same_fits(second, repaired(lm, calib, [4, 5, 6, 7]))
    assert second[1]["dense_layer_tokens"] == full // LAYERS
    third = repaired(lm, calib, [5, 6, 7], **reuse)  # cursor 4 and end 8 are stored: no pass
    assert_same_fits(third, repaired(lm, calib, [5, 6, 7]))
    assert third[1]["dense_layer_tokens"] == 0
    again = repaired(lm, calib, [6, 7], **reuse)
    assert_same_fits(again, first)
    assert again[1]["dense_layer_tokens"] == 0 and again[1]["dense_entries_read"] > 0


def test_another_models_states_are_never_used(tmp_path):
    """A store filled by a different dense model (one weight changed in layer 5) serves the
    boundaries up to 5 only (the state entering layer 5): the fit's target is recomputed."""
    lm, other = model(), model()
    with torch.no_grad():
        decoder_layers(other.model)[5].mlp.up_proj.weight[0, 0] += 1.0
    calib = calib_of(lm.tokenizer)
    reuse = dict(reuse=str(tmp_path / "dense"), reuse_layers=2)
    repaired(other, calib, [6, 7], **reuse)
    got = repaired(lm, calib, [6, 7], **reuse)
    assert_same_fits(got, repaired(lm, calib, [6, 7]))
    full = LAYERS * sum(int(b["attention_mask"].numel()) for b in calib.batches(3))
    # boundary 5 (the cursor, stored by the other run) is the same in both: layers 5..7 run
    assert got[1]["dense_layer_tokens"] == full * (LAYERS - 5) // LAYERS


def test_a_damaged_entry_is_recomputed_not_used(tmp_path):
    lm = model()
    calib = calib_of(lm.tokenizer)
    reuse = dict(reuse=str(tmp_path / "dense"), reuse_layers=2)
    first = repaired(lm, calib, [6, 7], **reuse)
    for path in (tmp_path / "dense").glob("*/*.bin"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # the last byte of every payload
        path.write_bytes(bytes(data))
    again = repaired(lm, calib, [6, 7], **reuse)
    assert_same_fits(again, first)
    assert again[1]["dense_layer_tokens"] == first[1]["dense_layer_tokens"]


def test_kept_boundaries():
    assert kept_boundaries(4, 8) == {4, 8}
    assert kept_boundaries([0, 3, 9], 8) == {3}


def test_store_settings_are_checked_before_the_model_loads_and_never_hashed(
    tmp_path, data_root, monkeypatch
):
    from omegaconf import OmegaConf

    from mka_exp import pipeline
    from mka_exp.preflight import check_config

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pipeline, "load_session", no_load)
    base = ["repair=linear", "method=reverse_prune"]
    bad = ["repair.reuse=5", "repair.reuse_layers=0", "repair.reuse_bytes=0"]
    with pytest.raises(Exception) as err:  # noqa: PT011 (Hydra wraps the ConfigError)
        pipeline.run(compose_config([*base, *bad, *SHRINK], tmp_path, data_root))
    for problem in ("repair.reuse=5: allowed null/false", "repair.reuse_layers=0: allowed an",
                    "repair.reuse_bytes=0: allowed an integer >= 1"):  # fmt: skip
        assert problem in str(err.value)
    off = compose_config(base, tmp_path, data_root)
    on = compose_config([*base, f"repair.reuse={tmp_path}/d", "repair.reuse_layers=[3]"],
                        tmp_path, data_root)  # fmt: skip
    check_config(on)
    hashes = {config_hash(OmegaConf.to_container(c, resolve=True)) for c in (off, on)}
    assert len(hashes) == 1


def test_reverse_prune_repair_through_the_method(tmp_path):
    """As the pipeline runs it (the method's own stats), with and without a store."""
    lm = model()
    calib = calib_of(lm.tokenizer)

    def run(**reuse):
        copy_ = copy.deepcopy(lm)
        repair = LinearRepair(ridge=0.5, max_tokens=None, batch_size=3, **reuse)
        dense = repair.prepare(copy_.model, calib)
        stats = ReversePrune(num_layers=3).compress(copy_.model, calib)
        result = repair.repair(copy_.model, calib, stats, dense)
        return [layer.mlp.down_proj.weight for layer in decoder_layers(copy_.model)], result

    assert_same_fits(run(reuse=str(tmp_path / "d")), run())
    assert len(list((tmp_path / "d").glob("*/*.bin"))) > 0
