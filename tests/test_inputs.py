"""Inputs that cannot surprise: finite weights at every stage, one model source, a layer count
alone, and the config hashes of committed records unchanged by any of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mka_exp import models, pipeline, results
from mka_exp.models import NonFiniteWeights, check_finite
from tests.helpers import REPO_ROOT, compose_config

EVIDENCE = sorted(REPO_ROOT.glob("docs/evidence/*/records/*.json"))


# --- finite weights -------------------------------------------------------------------------


def test_check_finite_names_the_parameter_and_counts(tiny):
    check_finite(tiny.model, "load")  # a fresh model passes
    weight = tiny.model.model.layers[2].mlp.down_proj.weight
    with torch.no_grad():
        weight[0, :3] = float("nan")
        weight[1, 0] = float("inf")
    with pytest.raises(NonFiniteWeights) as info:
        check_finite(tiny.model, "repair")
    line = str(info.value)
    assert "\n" not in line and "after repair" in line
    assert "model.layers.2.mlp.down_proj.weight holds 4 NaN/inf values" in line


def test_check_finite_skips_integer_tensors(tiny):
    tiny.model.register_buffer("packed", torch.full((4,), 7, dtype=torch.int8))
    check_finite(tiny.model, "quantization")


@pytest.mark.parametrize("stage", ["load", "compression", "repair", "quantization"])
def test_a_non_finite_model_stops_the_point_unrecorded(stage, tmp_path, data_root, monkeypatch):
    """NaNs entering at any stage stop the run with one line; no record, no table row."""
    overrides = ["method=reverse_prune", "method.ratio=0.25", "eval.tasks=[piqa]"]
    overrides += {"repair": ["repair=linear"], "quantization": ["quant=rtn"]}.get(stage, [])
    cfg = compose_config(overrides, tmp_path, data_root)
    poison = {
        "load": (pipeline, "instantiate"),
        "compression": ("mka_exp.methods.reverse_prune.ReversePrune", "compress"),
        "repair": ("mka_exp.repair.linear.LinearRepair", "repair"),
        "quantization": ("mka_exp.quantizers.llmcompressor.RTN", "quantize"),
    }[stage]
    poisoned_after(monkeypatch, *poison, stage == "load")
    with pytest.raises(NonFiniteWeights, match=f"after {stage}: model.layers.0.self_attn.q_proj"):
        pipeline.run(cfg)
    assert not list((tmp_path / "records").glob("*.json"))
    assert not (tmp_path / "run" / "results.json").exists()


def poisoned_after(monkeypatch, owner, name: str, loading: bool) -> None:
    """Wrap `owner.name` so that the model it handles gets a NaN in its first q_proj."""
    import importlib

    if isinstance(owner, str):
        module, cls = owner.rsplit(".", 1)
        owner = getattr(importlib.import_module(module), cls)
    original = getattr(owner, name)

    def nan_in(model) -> None:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        if loading and isinstance(out, models.LoadedModel):
            nan_in(out.model)
        elif not loading:
            model = out[0] if name == "quantize" else args[1]
            nan_in(model)
        return out

    monkeypatch.setattr(owner, name, wrapped)


# --- one model source -----------------------------------------------------------------------


def test_an_explicit_path_beside_the_groups_wheel_is_refused(tmp_path, data_root):
    cfg = compose_config(["model=smollm2_135m", "model.name_or_path=/etc"], tmp_path, data_root)
    with pytest.raises(ValueError) as info:
        pipeline.run(cfg)  # before any fetch or load: the check runs with the config checks
    line = str(info.value)
    assert "\n" not in line and "model.name_or_path='/etc'" in line
    assert "model.pip_package=null" in line


def test_a_folder_that_is_no_model_says_so(tmp_path, data_root):
    overrides = ["model=smollm2_135m", "model.name_or_path=/etc", "model.pip_package=null"]
    cfg = compose_config([*overrides, "model.gguf_file=null"], tmp_path, data_root)
    with pytest.raises(ValueError, match=r"'/etc' is not a model directory \(it has no config"):
        pipeline.run(cfg)
    cfg = compose_config(overrides, tmp_path, data_root)  # the group's GGUF name kept
    with pytest.raises(ValueError, match=r"model.gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf'"):
        pipeline.run(cfg)


def test_a_gguf_file_given_as_the_path_points_to_its_folder(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"is a file.*model.gguf_file='m.gguf'"):
        models.check_source(str(gguf), None, None)


def test_a_model_folder_passes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    models.check_source(str(tmp_path), None, None)
    models.check_source("org/hub-model", None, None)  # a hub id is looked up later
    models.check_source(None, "x.gguf", "some-wheel")


# --- a layer count alone --------------------------------------------------------------------


def test_num_layers_alone_replaces_the_default_ratio(tmp_path, data_root):
    cfg = compose_config(["method=reverse_prune", "method.num_layers=2"], tmp_path, data_root)
    record = pipeline.run(cfg)
    assert record["layers_after"] == 2 and record["method_stats"]["removed_layers"] == [2, 3]
    assert record["config"]["method"]["ratio"] is None
    assert record["config"]["method"]["num_layers"] == 2


def test_num_layers_with_a_curve_is_refused(tmp_path, data_root):
    overrides = ["method=reverse_prune", "method.num_layers=2", "curve=[0.25,0.5]"]
    cfg = compose_config(overrides, tmp_path, data_root)
    with pytest.raises(ValueError, match=r"curve=\[0.25, 0.5\] and method.num_layers=2"):
        pipeline.run(cfg)


def test_ratio_alone_keeps_the_config_as_it_was(tmp_path, data_root):
    cfg = compose_config(["method=mka"], tmp_path, data_root)
    pipeline.settle_amount(cfg)
    assert cfg.method.ratio == 0.25 and cfg.method.num_layers is None


# --- committed records ----------------------------------------------------------------------


@pytest.mark.parametrize("path", EVIDENCE, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_committed_records_keep_their_config_hash(path: Path, data_root):
    """The evidence's records still hash to their keys (data_root: this machine's mirror)."""
    record = json.loads(path.read_text())
    config = record["config"]
    if config.get("data_root"):
        config["data_root"] = str(data_root)
    assert results.config_hash(config) == record["config_hash"]
