"""Linear repair (ReplaceMe's least squares folded into down_proj): exact where it can be, better
than no repair on a real-shape model, reloadable, per point on curves, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from mka_exp import pipeline, preflight
from mka_exp.calibration import tokenize
from mka_exp.layers import decoder_layers, remove_layers
from mka_exp.methods.mka import MKA
from mka_exp.methods.reverse_prune import ReversePrune
from mka_exp.models.saving import save_compressed
from mka_exp.models.toy import build_random_model
from mka_exp.repair.fit import (
    RIDGE_SCALES,
    NormalEquations,
    fold_into,
    relative_residual,
    solve_map,
)
from mka_exp.repair.linear import LinearRepair, fit_positions, repair_plan
from mka_exp.repair.none import NoRepair
from mka_exp.results import records
from mka_exp.results.records import config_hash
from tests.helpers import REPO_ROOT, compose_config

TEXTS = [
    f"Sentence {i}: the {w} fox jumps over {i * 7} lazy dogs, then asks whether the sky is blue."
    for i, w in enumerate(["quick", "slow", "red", "tired", "small", "big", "old", "young"] * 3)
]
SHRINK = ["eval.tasks=[piqa]", "eval.limit=4"]


def calib_of(tok, texts=TEXTS):
    return tokenize(list(texts), tok, max_length=48, name="t", batch_size=8)


def final_hidden(model, calib) -> torch.Tensor:
    """The last decoder layer's output (after the final norm) on every non-pad token."""
    with torch.no_grad():
        out = model.model(input_ids=calib.input_ids, attention_mask=calib.attention_mask)
    return out.last_hidden_state[calib.attention_mask.bool()]


def logits_of(model, calib) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=calib.input_ids, attention_mask=calib.attention_mask).logits


# --------------------------------------------------------------------------- the fit


def linear_layer_model():
    """A 4-layer Llama whose layer 1 is linear in the residual stream, x -> x + x C, and reads
    only the channels layer 0's MLP writes to: removing it is exactly undone by T = I + C.

    Channels split in two halves: embeddings and every attention write live in the first half,
    layer 0's MLP writes only to the second (so Y and M are disjoint); layer 1 has no attention
    and no norm before its MLP, which is a plain Linear C mapping the second half to itself.
    """
    lm = build_random_model("llama", num_layers=4, hidden_size=64, device="cpu", seed=3)
    model, half = lm.model, 32
    layers = decoder_layers(model)
    torch.manual_seed(0)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, half:] = 0
        for layer in layers:
            layer.self_attn.o_proj.weight[half:] = 0
        layers[0].mlp.down_proj.weight[:half] = 0
        layers[1].self_attn.o_proj.weight.zero_()
        mixer = nn.Linear(64, 64, bias=False)
        mixer.weight.zero_()
        mixer.weight[half:, half:] = 0.3 * torch.randn(half, half)
    layers[1].post_attention_layernorm = nn.Identity()
    layers[1].mlp = mixer
    return lm


def test_linear_repair_recovers_a_linear_layer_exactly():
    lm = linear_layer_model()
    calib = calib_of(lm.tokenizer)
    dense_logits = logits_of(lm.model, calib)
    repair = LinearRepair()
    dense = repair.prepare(lm.model, calib)
    remove_layers(lm.model, [1])
    cut_logits = logits_of(lm.model, calib)
    assert (cut_logits - dense_logits).abs().max() > 1e-2  # the layer mattered
    stats = repair.repair(lm.model, calib, {"removed_layers": [1]}, dense)
    torch.testing.assert_close(logits_of(lm.model, calib), dense_logits, atol=1e-4, rtol=1e-4)
    (fit,) = stats["fits"]
    assert fit["layer"] == 0 and fit["span"] == [0, 1] and fit["merged"] is False
    assert fit["residual_before"] > 0.1 and fit["residual_after"] < 1e-5


def hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def boundary_states(model, calib) -> list[torch.Tensor]:
    """Today's in-memory capture: every layer boundary's hidden state on every non-pad token."""
    layers, mask, out = decoder_layers(model), calib.attention_mask.bool(), []
    hooks = [layers[0].register_forward_pre_hook(lambda m, a: out.append(a[0][mask]))]
    hooks += [
        layer.register_forward_hook(lambda m, a, o: out.append(hidden_of(o)[mask]))
        for layer in layers
    ]
    logits_of(model, calib)
    for hook in hooks:
        hook.remove()
    return out


def layer_parts(model, calib, position) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, Y) of layer `position` on every non-pad token, from a full forward pass."""
    layer, mask, seen = decoder_layers(model)[position], calib.attention_mask.bool(), {}
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, o: seen.update(mlp=o[mask])),
        layer.register_forward_hook(lambda m, a, o: seen.update(out=hidden_of(o)[mask])),
    ]
    logits_of(model, calib)
    for hook in hooks:
        hook.remove()
    return seen["mlp"].double(), (seen["out"] - seen["mlp"]).double()


def in_memory_repair(dense_model, model, calib, stats, ridge) -> None:
    """The fit as it was before streaming: all dense states kept, stacked matrices, solved."""
    states = boundary_states(dense_model, calib)
    plan, _ = repair_plan(stats, len(states) - 1)
    for item in plan:
        m, y = layer_parts(model, calib, item["position"])
        target = states[item["span"][-1] + 1].double() - y
        eye = torch.eye(m.shape[1], dtype=torch.float64)
        transform = torch.linalg.solve(m.T @ m + ridge * eye, m.T @ target)
        fold_into(decoder_layers(model)[item["position"]].mlp.down_proj, transform)


@pytest.mark.parametrize(
    ("model_type", "method"),
    [
        ("llama", ReversePrune(num_layers=2)),
        ("llama", "cut_2_5"),
        ("qwen2", MKA(num_layers=2, cache=None)),
    ],
    ids=["llama-reverse_prune", "llama-two-cuts", "qwen2-mka"],
)
def test_streaming_fit_equals_the_in_memory_fit(model_type, method):
    """Streamed sums, dense copy and a compressed pass started at the first changed layer give
    the maps of the in-memory fit on the same tokens (front to back, every fit)."""
    lm = build_random_model(model_type, num_layers=7, hidden_size=64, device="cpu", seed=2)
    calib = calib_of(lm.tokenizer)
    dense_model = copy.deepcopy(lm.model)
    repair = LinearRepair(ridge=0.5, max_tokens=None, batch_size=3)
    dense = repair.prepare(lm.model, calib)
    if method == "cut_2_5":
        remove_layers(lm.model, [2, 5])
        stats = {"removed_layers": [2, 5]}
    else:
        stats = method.compress(lm.model, calib)
    reference = copy.deepcopy(lm.model)
    result = repair.repair(lm.model, calib, stats, dense)
    in_memory_repair(dense_model, reference, calib, stats, 0.5)
    assert result["fits"] and result["tokens"] == int(calib.attention_mask.sum())
    for ours, full in zip(decoder_layers(lm.model), decoder_layers(reference), strict=True):
        torch.testing.assert_close(ours.mlp.down_proj.weight, full.mlp.down_proj.weight)
    # The dense copy is never changed: it still gives the dense model's logits.
    torch.testing.assert_close(logits_of(dense.model, calib), logits_of(dense_model, calib))


def split_calib(tok, fit_count=16):
    """A calibration set of the first prompts with the rest as its held-out part."""
    calib = calib_of(tok, TEXTS[:fit_count])
    calib.heldout = calib_of(tok, TEXTS[fit_count:])
    return calib


def test_heldout_residual_is_the_repaired_layers_error_on_unseen_tokens():
    """‖repaired output − L‖ / ‖L − Y‖ on the held-out prompts, from full forward passes."""
    lm = build_random_model("llama", num_layers=6, hidden_size=64, device="cpu", seed=4)
    calib = split_calib(lm.tokenizer)
    dense_model = copy.deepcopy(lm.model)
    repair = LinearRepair(ridge=0.1)
    dense = repair.prepare(lm.model, calib)
    stats = ReversePrune(num_layers=2).compress(lm.model, calib)  # kept layer 3 stands for 3..5
    target = boundary_states(dense_model, calib.heldout)[6].double()
    m, y = layer_parts(lm.model, calib.heldout, 3)
    result = repair.repair(lm.model, calib, stats, dense)
    m_after, y_after = layer_parts(lm.model, calib.heldout, 3)
    torch.testing.assert_close(y_after, y)  # the map acts on M only
    scale = torch.linalg.norm(target - y)
    (fit,) = result["fits"]
    before = torch.linalg.norm(y + m - target) / scale
    after = torch.linalg.norm(y + m_after - target) / scale
    assert fit["heldout_residual_before"] == pytest.approx(float(before), rel=1e-5)
    assert fit["heldout_residual_after"] == pytest.approx(float(after), rel=1e-5)
    assert result["heldout_tokens"] == int(calib.heldout.attention_mask.sum())
    assert result["tokens"] == int(calib.attention_mask.sum())


def test_ridge_auto_picks_the_grid_point_with_the_lowest_heldout_residual():
    """Too few fit tokens for D = 64 (least squares overfits): auto picks a ridge > 0 by the
    held-out residual, records the grid, and folds the map of that ridge."""
    lm = build_random_model("llama", num_layers=6, hidden_size=64, device="cpu", seed=4)
    calib = split_calib(lm.tokenizer, fit_count=1)
    dense_model = copy.deepcopy(lm.model)
    repair = LinearRepair(ridge="auto")
    dense = repair.prepare(lm.model, calib)
    assert len(dense.picks) < 64
    stats = ReversePrune(num_layers=2).compress(lm.model, calib)
    reference = copy.deepcopy(lm.model)
    (fit,) = repair.repair(lm.model, calib, stats, dense)["fits"]
    grid = fit["ridge_grid"]
    assert [point["scale"] for point in grid] == list(RIDGE_SCALES)
    best = min(grid, key=lambda point: point["heldout_residual"])
    assert best["scale"] > 0 and fit["ridge"] == best["ridge"]
    assert fit["heldout_residual_after"] == pytest.approx(best["heldout_residual"])
    assert grid[0]["heldout_residual"] > best["heldout_residual"]
    in_memory_repair(dense_model, reference, calib, stats, fit["ridge"])
    torch.testing.assert_close(
        decoder_layers(lm.model)[3].mlp.down_proj.weight,
        decoder_layers(reference)[3].mlp.down_proj.weight,
    )


def test_a_list_of_scales_is_the_grid(tiny):
    calib = split_calib(tiny.tokenizer, fit_count=1)
    repair = LinearRepair(ridge=[10.0, 1.0])
    dense = repair.prepare(tiny.model, calib)
    stats = ReversePrune(num_layers=1).compress(tiny.model, calib)
    result = repair.repair(tiny.model, calib, stats, dense)
    (fit,) = result["fits"]
    assert result["ridge"] == [10.0, 1.0] and [p["scale"] for p in fit["ridge_grid"]] == [10, 1]
    best = min(fit["ridge_grid"], key=lambda point: point["heldout_residual"])
    assert fit["ridge"] == best["ridge"]
    big, small = fit["ridge_grid"]  # α = scale · tr(MᵀM) / D for both
    assert big["ridge"] == pytest.approx(10 * small["ridge"]) and small["ridge"] > 0


def test_ridge_auto_needs_heldout_tokens(tiny):
    with pytest.raises(ValueError, match="repair.ridge=auto .* has none"):
        LinearRepair(ridge="auto").prepare(tiny.model, calib_of(tiny.tokenizer))


def test_solve_map_is_the_ridge_closed_form_and_its_diagonal():
    torch.manual_seed(0)
    m, target = torch.randn(200, 8, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    eq = NormalEquations(m.T @ m, m.T @ target, float((target * target).sum()), 200)
    ridge = 3.0
    expected = torch.linalg.solve(m.T @ m + ridge * torch.eye(8, dtype=torch.float64), m.T @ target)
    torch.testing.assert_close(solve_map(eq, ridge, diagonal=False), expected)
    diag = solve_map(eq, ridge, diagonal=True)
    scale = (m * target).sum(0) / ((m * m).sum(0) + ridge)
    torch.testing.assert_close(diag, torch.diag(scale))
    exact = solve_map(eq, 0.0, diagonal=False)
    direct = torch.linalg.norm(m @ exact - target) / torch.linalg.norm(target)
    assert relative_residual(eq, exact) == pytest.approx(float(direct), rel=1e-9)
    before = torch.linalg.norm(m - target) / torch.linalg.norm(target)
    assert relative_residual(eq, None) == pytest.approx(float(before), rel=1e-9)


def test_repair_plan_spans_for_pruning_and_merges():
    plan, unrepaired = repair_plan({"removed_layers": [0, 3, 4, 7]}, 8)
    assert [(p["layer"], p["position"], p["span"]) for p in plan] == [
        (2, 1, [2, 3, 4]),
        (6, 3, [6, 7]),
    ]
    assert unrepaired == [0]
    merges = {"removed_layers": [5], "merges": [{"keep": 1, "drop": 5}]}
    plan, unrepaired = repair_plan(merges, 6)
    # The merged layer 1 is refitted to the dense boundary 2; layer 4 now stands for 4 and 5.
    assert [(p["layer"], p["span"], p["merged"]) for p in plan] == [
        (1, [1], True),
        (4, [4, 5], False),
    ]
    assert unrepaired == []
    with pytest.raises(ValueError, match="removed no decoder layers"):
        repair_plan({"removed_layers": []}, 6)


def test_fit_positions_options():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert fit_positions(mask, "all", 100, 0).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
    assert fit_positions(mask, "skip_first", 100, 0).tolist() == [[0, 1], [0, 2], [1, 1]]
    assert fit_positions(mask, "last", 100, 0).tolist() == [[0, 2], [1, 1]]
    assert len(fit_positions(mask, "all", 3, 0)) == 3


# --------------------------------------------------------------------------- real-shape models


@pytest.mark.parametrize(
    ("model_type", "method"),
    [("llama", ReversePrune(num_layers=2)), ("qwen2", MKA(num_layers=2, cache=None))],
    ids=["llama-reverse_prune", "qwen2-mka"],
)
def test_repair_lowers_final_hidden_error(model_type, method):
    lm = build_random_model(model_type, num_layers=6, hidden_size=64, device="cpu")
    calib = calib_of(lm.tokenizer)
    reference = final_hidden(lm.model, calib)
    repair = LinearRepair()
    dense = repair.prepare(lm.model, calib)
    stats = method.compress(lm.model, calib)
    before = torch.linalg.norm(final_hidden(lm.model, calib) - reference)
    repair_stats = repair.repair(lm.model, calib, stats, dense)
    after = torch.linalg.norm(final_hidden(lm.model, calib) - reference)
    assert after < 0.9 * before
    assert repair_stats["fits"] and repair_stats["tokens"] == int(calib.attention_mask.sum())
    for fit in repair_stats["fits"]:
        assert fit["residual_after"] < fit["residual_before"]


def test_repaired_model_saves_and_reloads_with_identical_logits(tmp_path):
    lm = build_random_model("llama", num_layers=6, hidden_size=64, device="cpu")
    calib = calib_of(lm.tokenizer)
    repair = LinearRepair(ridge=1.0)
    dense = repair.prepare(lm.model, calib)
    stats = ReversePrune(num_layers=2).compress(lm.model, calib)
    unrepaired = logits_of(lm.model, calib)
    repair.repair(lm.model, calib, stats, dense)
    repaired = logits_of(lm.model, calib)
    assert (repaired - unrepaired).abs().max() > 1e-3
    save_compressed(lm.model, lm.tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    assert torch.equal(logits_of(reloaded, calib), repaired)


# --------------------------------------------------------------------------- pipeline


def test_pipeline_records_repair_and_curve_points_equal_single_runs(tmp_path, data_root):
    """A nested curve repairs each point on a copy: every point equals the single run."""
    common = ["method=shortgpt", "repair=linear", "repair.ridge=1.0", *SHRINK]
    pipeline.run(compose_config([*common, "curve=[0.25,0.5]"], tmp_path / "curve", data_root))
    for ratio in (0.25, 0.5):
        single = pipeline.run(
            compose_config([*common, f"method.ratio={ratio}"], tmp_path / "single", data_root)
        )
        point = records.load_record(tmp_path / "curve", single["config_hash"])
        assert point is not None
        assert point["repair_stats"]["fits"] == pytest.approx(single["repair_stats"]["fits"])
        assert point["metrics"] == pytest.approx(single["metrics"], abs=1e-6)
        assert "repair" not in point["method_stats"] and "repair" in point["timings"]
    fits = single["repair_stats"]["fits"] + single["repair_stats"]["unrepaired_layers"]
    assert fits, "the 2-layer cut must be repaired or recorded as unrepaired"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=none"], "repair=linear needs a layer method .* method=none removes none"),
        (["method=sparsegpt"], "method=sparsegpt removes none"),
        (["repair.positions=middle"], "repair.positions='middle' is not allowed"),
        (["repair.ridge=-1"], "repair.ridge=-1 must be a number >= 0, auto, or a non-empty"),
        (["repair.ridge=best"], "repair.ridge='best' must be a number >= 0, auto, or a"),
        (["repair.ridge=[]"], r"repair.ridge=\[\] must be .* list of scales >= 0"),
        (["repair.ridge=[1,-2]"], r"repair.ridge=\[1, -2\] must be"),
        (["repair.max_tokens=0"], "repair.max_tokens=0 must be an integer >= 1 or null"),
    ],
)
def test_bad_repair_input_fails_before_the_model_loads(
    overrides, message, tmp_path, data_root, monkeypatch
):
    cfg = compose_config(["repair=linear", *overrides, *SHRINK], tmp_path, data_root)

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pipeline, "load_session", no_load)
    with pytest.raises(Exception, match=message):
        pipeline.run(cfg)


def test_too_few_tokens_without_ridge(tmp_path, data_root):
    cfg = compose_config(
        ["method=reverse_prune", "repair=linear", "repair.max_tokens=10", *SHRINK],
        tmp_path,
        data_root,
    )
    with pytest.raises(ValueError, match="10 calibration tokens .* fewer than the hidden size 64"):
        pipeline.run(cfg)
    ok = compose_config(
        [
            "method=reverse_prune",
            "repair=linear",
            "repair.max_tokens=10",
            "repair.ridge=1",
            *SHRINK,
        ],
        tmp_path,
        data_root,
    )
    assert pipeline.run(ok)["repair_stats"]["tokens"] == 10


PASSAGES = ["calib=hellaswag_passages", "calib.num_tokens=1500", "calib.heldout_tokens=400"]


def test_pipeline_fits_on_passages_and_reports_heldout_residuals(tmp_path, data_root):
    overrides = ["method=reverse_prune", "repair=linear", "repair.ridge=auto", *PASSAGES]
    overrides += ["repair.max_tokens=null", *SHRINK]
    record = pipeline.run(compose_config(overrides, tmp_path, data_root))
    stats = record["repair_stats"]
    assert stats["ridge"] == "auto" and stats["tokens"] >= 1500 and stats["heldout_tokens"] >= 400
    for fit in stats["fits"]:
        assert fit["heldout_residual_after"] == min(
            point["heldout_residual"] for point in fit["ridge_grid"]
        )
    assert record["calibration"]["name"].startswith("hellaswag_passages_1000_")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.limit=null"], "eval.limit=None: calib=hellaswag_passages fits on hellaswag rows"),
        (["eval.limit=0.5"], "eval.limit=0.5: .* could read them"),
        (["eval.limit=1001"], "eval.limit=1001: .* allowed: eval.limit an integer <= 1000"),
        (["eval.limit=20", "+eval.sample_seed=3"], "eval.sample_seed=3: .* could read them"),
    ],
)
def test_passages_refuse_an_evaluation_that_could_read_them(
    overrides, message, tmp_path, data_root
):
    cfg = compose_config([*PASSAGES, "eval.tasks=[hellaswag]", *overrides], tmp_path, data_root)
    with pytest.raises(ValueError, match=message):
        preflight.check_config(cfg)


def test_passages_allow_the_first_rows_and_other_tasks(tmp_path, data_root):
    for overrides in (["eval.tasks=[hellaswag]", "eval.limit=1000"], ["eval.tasks=[piqa]"]):
        preflight.check_config(compose_config([*PASSAGES, *overrides], tmp_path, data_root))
    whole = compose_config([*PASSAGES, "eval.tasks=[piqa]", "eval.limit=null"], tmp_path, data_root)
    preflight.check_config(whole)


def test_an_existing_repair_record_keeps_its_config_hash(data_root):
    """The streaming fit, ridge=auto and max_tokens=null add no key: old records still match."""
    folder = REPO_ROOT / "docs" / "evidence" / "qwen05b_tasks" / "records"
    record = json.loads((folder / "f82549dbdf85707c.json").read_text())
    assert record["config"]["repair"]["_target_"] == "mka_exp.repair.linear.LinearRepair"
    config = {**record["config"], "data_root": str(data_root)}
    assert config_hash(config) == record["config_hash"]


def test_no_repair_changes_nothing(tiny):
    assert NoRepair().repair(tiny.model, None, {"removed_layers": [1]}, None) == {}
