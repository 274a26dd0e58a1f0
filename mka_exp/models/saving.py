"""Write a compressed (and maybe quantized) model + tokenizer to disk; report bytes on disk.

Plain models are saved as Hugging Face safetensors. Models that went through llm-compressor
(quantized with compressed-tensors schemes, or sparsified by SparseGPT) have a wrapped
`save_pretrained` and are saved compressed (`save_compressed=True`: packed int4/int8 weights,
sparse bitmasks), the format llm-compressor documents; `AutoModelForCausalLM.from_pretrained`
decompresses them on load. bitsandbytes models use transformers' own serialisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def is_llmcompressor_model(model: torch.nn.Module) -> bool:
    """True when llm-compressor's `oneshot` has wrapped the model's `save_pretrained`."""
    return bool(getattr(model.save_pretrained, "_overridden", False)) or any(
        hasattr(m, "quantization_scheme") for m in model.modules()
    )


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_compressed(model: torch.nn.Module, tokenizer: Any, path: str | Path) -> int:
    """Save `model` and `tokenizer` under `path`; return the bytes written there.

    The model stays usable as before: llm-compressor's save packs the weights in memory and
    re-wraps the modules in offloading, so afterwards we unpack them and drop the wrappers.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if is_llmcompressor_model(model):
        save_llmcompressor_model(model, path)
    else:
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return directory_bytes(path)


@contextlib.contextmanager
def config_source_hidden(model: torch.nn.Module) -> Iterator[None]:
    """llm-compressor's save overwrites config.json with the config.json of the folder the model
    was loaded from (`config._name_or_path`, for vLLM), which still has every layer the model
    had before it was cut. Without that path it keeps transformers' config of the model as is."""
    source = model.config._name_or_path
    model.config._name_or_path = ""
    try:
        yield
    finally:
        model.config._name_or_path = source


def save_llmcompressor_model(model: torch.nn.Module, path: Path) -> None:
    from compressed_tensors import ModelCompressor
    from compressed_tensors.offload import OffloadCache
    from compressed_tensors.offload.dispatch import remove_dispatch
    from compressed_tensors.quantization import QuantizationStatus
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        modify_save_pretrained,
    )

    was_offloaded = any(isinstance(m._parameters, OffloadCache) for m in model.modules())
    modify_save_pretrained(model)  # no-op when oneshot already wrapped it
    with config_source_hidden(model):
        model.save_pretrained(path, save_compressed=True)
    compressed = any(
        getattr(m, "quantization_status", None) == QuantizationStatus.COMPRESSED
        for m in model.modules()
    )
    if compressed:  # back to float weights: forward need not unpack int4 on every call
        ModelCompressor.from_pretrained_model(model).decompress_model(model)
    if not was_offloaded:
        remove_dispatch(model)
