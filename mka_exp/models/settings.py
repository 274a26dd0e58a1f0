"""A model config's settings read and checked without loading anything: the device and dtype
it asks for (resolved against this machine), where the model comes from (one source, and a local
path that is a model), and the pins of a GGUF file.

May import: torch. Imported by the rest of `models` and by `preflight.check_config`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device(device: Any) -> None:
    """`auto`, `cpu`, or an accelerator this machine has (`cuda`, `cuda:<i>`, `mps`)."""
    if device == "auto":
        return
    allowed = "auto, cpu" + (", cuda, cuda:<index>" if torch.cuda.is_available() else "")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"model.device={device!r} is not a device; allowed here: {allowed}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"model.device={device!r}: this machine has no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); allowed here: {allowed}"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"model.device={device!r}: only {torch.cuda.device_count()} CUDA device(s); "
            f"allowed: cuda:0 ... cuda:{torch.cuda.device_count() - 1}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"model.device={device!r}: MPS is not available; allowed here: {allowed}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"model.device={device!r}: allowed here: {allowed}")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)  # one line (not torch's AssertionError) for a device this machine lacks
    return device


def check_dtype(dtype: Any, allowed: Iterable[str]) -> None:
    """`auto` or one of `allowed` (the dtypes the loaders know: `DTYPES`)."""
    choices = ("auto", *allowed)
    if dtype not in choices:
        raise ValueError(f"model.dtype={dtype!r}: allowed {', '.join(choices)}")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 on GPU and float32 on CPU (CPU half-precision matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    check_dtype(dtype, DTYPES)  # the same one line as the config check
    return DTYPES[dtype]


def pinned(size: int | None, sha256: str | None, pins: dict) -> tuple[int | None, str | None]:
    """The GGUF's pins: `model.gguf_size`/`gguf_sha256` (hashed: older records carry them) or
    `model.pins` (not hashed: pins refuse a wrong file, they never change a result)."""
    unknown = set(pins) - {"size", "sha256"}
    if unknown:
        raise ValueError(f"model.pins: unknown key(s) {sorted(unknown)}; allowed: size, sha256")
    for key, value, pin in (("gguf_size", size, "size"), ("gguf_sha256", sha256, "sha256")):
        if value is not None and pins.get(pin) is not None and str(value) != str(pins[pin]):
            raise ValueError(
                f"model.{key}={value} and model.pins.{pin}={pins[pin]} disagree; allowed: one pin"
            )
    return size or pins.get("size"), sha256 or pins.get("sha256")


def check_source(
    name_or_path: str | None, gguf_file: str | None, pip_package: str | list | None
) -> None:
    """The model comes from exactly one place, and a local one is a model: checked before
    anything is fetched or loaded. A model group that loads from a wheel refuses an explicit
    `model.name_or_path` rather than ignore it (the record would name a model it did not load)."""
    if pip_package and name_or_path:
        wheel = pip_package if isinstance(pip_package, str) else f"{len(pip_package)} wheel parts"
        raise ValueError(
            f"model.name_or_path={name_or_path!r} and model.pip_package ({wheel}) both say where "
            "the model comes from; allowed: one of them (to load that path add "
            "model.pip_package=null, and model.gguf_file=<file in it> or null)"
        )
    if not pip_package and not name_or_path:
        raise ValueError(
            "model.name_or_path is required (a hub id or a local directory), or model.pip_package"
        )
    if name_or_path:
        check_local_path(name_or_path, gguf_file)


def check_local_path(name_or_path: str, gguf_file: str | None) -> None:
    """A path-looking source that does not exist, or is no model, is a user error, not a hub
    lookup (nor a tokenizer error from deep inside transformers)."""
    looks_local = name_or_path.startswith(("/", ".", "~")) or os.path.exists(name_or_path)
    if not looks_local:
        return
    path = Path(name_or_path).expanduser()
    key = f"model.name_or_path={name_or_path!r}"
    if not path.exists():
        raise FileNotFoundError(f"{key} does not exist")
    if path.is_file():
        raise ValueError(
            f"{key} is a file; allowed: a model directory, or for a GGUF its folder as "
            f"model.name_or_path={str(path.parent)!r} and model.gguf_file={path.name!r}"
        )
    if gguf_file and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"model.gguf_file={gguf_file!r} not found in {path}")
    if not gguf_file and not (path / "config.json").is_file():
        raise ValueError(
            f"{key} is not a model directory (it has no config.json); allowed: a folder written "
            "by save_pretrained, or model.gguf_file=<a .gguf in it>"
        )


def check_model_source(model: dict[str, Any]) -> None:
    """A pretrained model's source: one of path or wheel, and a local path is a model."""
    if str(model.get("_target_")).endswith(".load_pretrained"):
        check_source(model.get("name_or_path"), model.get("gguf_file"), model.get("pip_package"))
