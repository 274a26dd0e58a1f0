"""GGUF files: the layer count read from the metadata header (no tensors), a local GGUF checked
against its pins, and the float32 safetensors copy made once per file (dequantizing is slow).

May import: transformers, torch, `models.seals`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mka_exp.models.seals import cache_dir, copy_problem, discard, seal_copy, sealed_problem

log = logging.getLogger(__name__)


GGUF_MAGIC = b"GGUF"


def check_pinned_file(path: Path, size: int | None, sha256: str | None) -> None:
    """A local GGUF with pins matches them (hashed in full on every use: the folder is the user's,
    so no seal is kept beside it), or one line names it; without pins there is nothing to check."""
    if size is None and sha256 is None:
        return
    problem, _ = sealed_problem(path, {"size": size}, sha256)
    if sha256 is None and problem == "no digest recorded or pinned":
        return  # a size pin alone: the size matched
    if problem:
        raise ValueError(
            f"model.gguf_file: {path}: {problem}; allowed: the pinned file, or another one "
            "unpinned (model.pins=null, or model.gguf_size=null model.gguf_sha256=null)"
        )


def dequantized_copy(gguf: Path) -> Path:
    """A float32 safetensors copy (model + tokenizer) of a GGUF file, made once in `cache_dir()`.

    Keyed by the file's path, size and mtime; written to a temporary folder and renamed, so
    parallel jobs never read a half-written copy. Each file of the copy is sealed when written
    (`COPY_SEALS`) and checked before every use; a copy that fails is named and rebuilt.
    """
    if not gguf.exists():
        raise FileNotFoundError(f"model.gguf_file: {gguf} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "dequantized" / f"{gguf.stem}-{key[:12]}"
    if target.exists():
        problem = copy_problem(target)
        if problem is None:
            return target
        log.warning("dequantized copy %s: %s; rebuilding it", target, problem)
        discard(target)
    log.info("Dequantizing %s once into %s", gguf.name, target)
    model, tokenizer = read_gguf(gguf)
    tmp = Path(
        tempfile.mkdtemp(dir=target.parent.mkdir(parents=True, exist_ok=True) or target.parent)
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    honour_umask(tmp)
    seal_copy(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another job finished first: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF dequantized to float32, or one line naming the file that could not be read
    (transformers says `cannot reshape array...` for a truncated one)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, OSError, KeyError, EOFError) as err:
        raise ValueError(
            f"model.gguf_file: {gguf} ({gguf.stat().st_size:,} bytes) could not be read as a "
            f"GGUF, truncated or damaged? ({err})"
        ) from None
    drop_gguf_marker(model)
    return model, tokenizer


def honour_umask(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; the cache is shared like any output."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def drop_gguf_marker(model: PreTrainedModel) -> None:
    """Weights are already dequantized; without the GGUF marker `save_pretrained` works."""
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def gguf_layer_count(path: Path) -> int:
    """`<architecture>.block_count` from a GGUF's metadata header, read without its tensors
    (gguf's `GGUFReader` parses every tokenizer entry: 12 s on SmolLM2; this reads until found)."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"model.gguf_file: {path} is not a GGUF (no GGUF magic)")
        _, _, count = struct.unpack("<IQQ", f.read(20))
        arch = None
        for _ in range(count):
            key = read_gguf_string(f)
            value = read_gguf_value(f, struct.unpack("<I", f.read(4))[0])
            if key == "general.architecture":
                arch = value
            elif arch and key == f"{arch}.block_count":
                return int(value)
    raise ValueError(f"model.gguf_file: {path} names no layer count (<architecture>.block_count)")


# GGUF metadata value types (gguf.GGUFValueType) as struct formats; 8 is a string, 9 an array.
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}


GGUF_SCALARS[12] = "d"


def read_gguf_string(f) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", errors="replace")


def read_gguf_value(f, kind: int):
    """One metadata value; an array of numbers is skipped (its values are never needed here)."""
    if kind in GGUF_SCALARS:
        fmt = "<" + GGUF_SCALARS[kind]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == 8:
        return read_gguf_string(f)
    if kind != 9:
        raise ValueError(f"unknown GGUF metadata type {kind}")
    item, length = struct.unpack("<IQ", f.read(12))
    if item in GGUF_SCALARS:
        f.seek(length * struct.calcsize("<" + GGUF_SCALARS[item]), os.SEEK_CUR)
        return None
    for _ in range(length):
        read_gguf_value(f, item)
    return None
