"""A model folder (`model.name_or_path=/dir`, or a hub snapshot) is sealed on first load in the
project's cache and checked before every later load: a changed, truncated or missing file is
named in one line (refused for a local folder, fetched again for a hub snapshot)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mka_exp import canonical
from mka_exp.models import folder_seals, loading, seals, toy
from mka_exp.results import records
from tests.helpers import CONF, compose_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A config-built model and its tokenizer as `save_pretrained` writes them."""
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    lm = toy.build_random_model("llama", num_layers=2, hidden_size=64, device="cpu")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the saved model, with the project cache under `tmp_path`."""
    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(saved, tmp_path / "model"))


def load(path, **kwargs):
    return loading.load_pretrained(str(path), device="cpu", **kwargs)


def full_hashes(monkeypatch) -> list[Path]:
    """Every full sha256 computed from here on (the function in the module that holds it)."""
    calls, original = [], seals.file_sha256

    def counted(path):
        calls.append(Path(path))
        return original(path)

    monkeypatch.setattr(seals, "file_sha256", counted)
    return calls


def no_weights_read(monkeypatch) -> None:
    """Loading anything from here on is a failure: the check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    for cls in ("AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(loading, cls), "from_pretrained", refuse)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- a local folder ----------------------------------------------------------------------------


def test_first_load_seals_the_folder_in_the_cache_not_in_it(folder):
    before = sorted(p.name for p in folder.iterdir())
    load(folder)
    assert sorted(p.name for p in folder.iterdir()) == before  # the user's folder untouched
    sealed = seals.read_json(folder_seals.sidecar(folder))
    assert folder_seals.sidecar(folder).is_relative_to(seals.cache_dir())
    assert sealed["folder"] == str(folder.resolve())
    names = set(sealed["files"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert names == set(folder_seals.read_files(folder))


def test_an_unchanged_folder_is_not_hashed_again(folder, monkeypatch):
    load(folder)
    assert folder_seals.sidecar(folder).is_file()
    calls = full_hashes(monkeypatch)
    load(folder)
    assert calls == []


def test_a_touched_identical_file_is_hashed_once_then_trusted(folder, monkeypatch):
    load(folder)
    os.utime(folder / "model.safetensors", ns=(1, 1))  # metadata only: the same bytes
    calls = full_hashes(monkeypatch)
    load(folder)
    assert calls == [folder / "model.safetensors"]
    load(folder)
    assert len(calls) == 1


def damage(folder: Path, how: str) -> str:
    """Damage one file of the folder; the name the refusal must give."""
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if how == "modified_byte":
        data = bytearray(weights.read_bytes())
        overwrite(weights, size // 2, bytes([data[size // 2] ^ 0xFF]))
    elif how == "modified_same_times":  # the mtime set back: only the content tells
        stat = weights.stat()
        overwrite(weights, size - 100, b"\x00\x01\x02")
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: size // 3])
    elif how == "removed":
        weights.unlink()
    elif how == "tokenizer_changed":
        (folder / "tokenizer.json").write_text("{}")
        return "tokenizer.json"
    elif how == "weights_added":  # from_pretrained would read a new shard or format
        shutil.copy(weights, folder / "pytorch_model.bin")
        return "pytorch_model.bin"
    return "model.safetensors"


DAMAGES = [
    "modified_byte",
    "modified_same_times",
    "truncated",
    "removed",
    "tokenizer_changed",
    "weights_added",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_changed_local_file_is_refused_in_one_line_before_loading(folder, how, monkeypatch):
    load(folder)
    name = damage(folder, how)
    no_weights_read(monkeypatch)
    with pytest.raises(ValueError) as info:
        load(folder)
    line = str(info.value)
    assert "\n" not in line and f"model.name_or_path={str(folder)!r}" in line
    assert f"{name}: " in line and "+model.reseal=true" in line
    expected = {
        "truncated": "bytes where",
        "removed": "missing",
        "weights_added": "not sealed",
    }.get(how, "sha256")
    assert expected in line


def test_a_refusal_gives_recorded_and_found_digests(folder):
    load(folder)
    recorded = seals.read_json(folder_seals.sidecar(folder))["files"]["model.safetensors"]
    damage(folder, "modified_byte")
    with pytest.raises(ValueError) as info:
        load(folder)
    found = seals.file_sha256(folder / "model.safetensors")
    assert recorded["sha256"] in str(info.value) and found in str(info.value)


def test_reseal_accepts_the_new_contents(folder, monkeypatch):
    load(folder)
    damage(folder, "modified_byte")
    load(folder, reseal=True)
    calls = full_hashes(monkeypatch)
    load(folder)  # sealed again: trusted without a full hash
    assert calls == []


def test_a_dequantized_copy_is_not_sealed_twice(folder, monkeypatch):
    """The float32 copy of a GGUF has its own seals (`.verified.json`): no sidecar for it."""
    (folder / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(loading, "dequantized_copy", lambda gguf: folder)
    load(folder, gguf_file="m.gguf")
    assert not folder_seals.sidecar(folder).exists()


# --- a hub snapshot ----------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(saved, tmp_path, monkeypatch):
    """A Hugging Face cache holding `org/tiny` at COMMIT (snapshot files link to blobs), the hub
    offline, and `snapshot_download` fetching from the saved model: its calls are returned."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "hf" / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    for path in (repo / "refs", repo / "blobs", snapshot):
        path.mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)

    def place(name: str) -> None:
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copy(saved / name, blob)
        (snapshot / name).unlink(missing_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))

    for path in saved.iterdir():
        place(path.name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    calls = []

    def fetch(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        for name in kwargs["allow_patterns"]:
            place(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    return snapshot, calls


def test_a_hub_snapshot_is_sealed_on_first_load(hub, monkeypatch):
    snapshot, calls = hub
    load("org/tiny")
    assert set(seals.read_json(folder_seals.sidecar(snapshot))["files"]) >= {"model.safetensors"}
    counted = full_hashes(monkeypatch)
    load("org/tiny")
    assert counted == [] and calls == []


@pytest.mark.parametrize("how", ["modified_byte", "truncated", "removed"])
def test_a_changed_hub_file_is_named_and_fetched_again(hub, how, caplog):
    snapshot, calls = hub
    load("org/tiny")
    good = (snapshot / "model.safetensors").read_bytes()
    damage(snapshot, how)
    lm = load("org/tiny")
    assert lm.model is not None and (snapshot / "model.safetensors").read_bytes() == good
    assert len(calls) == 1
    repo_id, kwargs = calls[0]
    assert repo_id == "org/tiny" and kwargs["revision"] == COMMIT
    assert kwargs["force_download"] is True and kwargs["allow_patterns"] == ["model.safetensors"]
    lines = [r.getMessage() for r in caplog.records if "model.safetensors" in r.getMessage()]
    assert len(lines) == 1 and "fetching it again" in lines[0] and "org/tiny" in lines[0]
    assert folder_seals.check_hub("org/tiny", None) == snapshot  # sealed again: it passes


def test_a_changed_hub_file_that_cannot_be_fetched_is_one_line(hub, monkeypatch):
    import huggingface_hub

    snapshot, _ = hub
    load("org/tiny")
    damage(snapshot, "truncated")

    def offline(repo_id, **kwargs):
        raise OSError("the hub is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    no_weights_read(monkeypatch)
    with pytest.raises(ValueError) as info:
        load("org/tiny")
    line = str(info.value)
    assert "\n" not in line and "model.safetensors changed" in line
    assert "could not be fetched again (OSError: the hub is unreachable)" in line


# --- the key ---------------------------------------------------------------------------------


def test_reseal_is_a_known_key_outside_the_config_hash(tmp_path, data_root):
    from omegaconf import OmegaConf

    over = ["model=llama3_8b", "model.name_or_path=/some/dir"]
    plain = compose_config(over, tmp_path, data_root)
    resealed = compose_config([*over, "+model.reseal=true"], tmp_path, data_root)
    plain, resealed = (OmegaConf.to_container(c, resolve=True) for c in (plain, resealed))
    canonical.check_known_keys(resealed, CONF)
    assert "model.reseal" in records.NON_RESULT_KEYS
    assert records.config_hash(resealed) == records.config_hash(plain)


def test_a_run_on_a_changed_folder_stops_and_reseal_lets_it_run(folder, tmp_path, data_root):
    """Through the pipeline: the refusal before any record; `+model.reseal=true` reaches the
    loader (Hydra's instantiate) and records under the hash the run would have had without it."""
    from hydra.errors import InstantiationException

    from mka_exp import pipeline

    over = ["model=llama3_8b", f"model.name_or_path={folder}", "eval.tasks=[piqa]"]
    pipeline.run(compose_config([*over, "method.ratio=0.25"], tmp_path / "a", data_root))
    damage(folder, "modified_byte")
    cfg = compose_config([*over, "method.ratio=0.5"], tmp_path / "b", data_root)
    with pytest.raises(InstantiationException) as info:  # run.py prints its cause's one line
        pipeline.run(cfg)
    assert isinstance(info.value.__cause__, ValueError)
    assert "model.safetensors: sha256" in str(info.value.__cause__)
    assert not list((tmp_path / "b" / "records").glob("*.json"))
    cfg = compose_config(
        [*over, "method.ratio=0.5", "+model.reseal=true"], tmp_path / "b", data_root
    )
    record = pipeline.run(cfg)
    assert record["config"]["model"]["reseal"] is True
    assert len(list((tmp_path / "b" / "records").glob("*.json"))) == 1
