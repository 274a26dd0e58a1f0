"""Fingerprints of the bottom of a model: one digest per depth k of everything that shapes the
hidden state entering decoder layer k (the embedding and the stack's own buffers, layers 0..k-1,
the config as it bears on them, dtype, device kind).

Why a module of its own: two stages key stored hidden states by them (evaluation's reuse across
models, `evaluation.reuse`; the linear repair's dense states, `repair.dense_states`), and a
stage never imports another.

    prints = fingerprints(model, upto=24)          # prints[k]: layers below k

May import: torch, `layers`. Floor 2.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mka_exp.layers import decoder_layers

# config fields that removing layers above k rewrites without changing layers 0..k-1; the
# per-layer lists are sliced to k instead, and a layer's MLP kind shows in its parameter names
LAYER_COUNT_FIELDS = ("num_hidden_layers", "decoder_sparse_step", "mlp_only_layers")
NOT_MODEL_FIELDS = ("_name_or_path", "transformers_version", "architectures")


def tensor_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
    digest.update(memoryview(data))


def module_digest(module: nn.Module, skip: Sequence[str] = ()) -> str:
    """Every parameter and buffer (name, dtype, shape, bytes) and every submodule's type."""
    digest = hashlib.blake2b(digest_size=20)
    for name, sub in module.named_modules():
        if not any(name == s or name.startswith(s + ".") for s in skip):
            digest.update(f"{name}:{type(sub).__qualname__}\n".encode())
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if not any(name.startswith(s + ".") for s in skip):
            tensor_digest(digest, name, tensor)
    return digest.hexdigest()


def config_view(config: Any, k: int) -> dict[str, Any]:
    """The config as it bears on layers 0..k-1: per-layer lists sliced, layer counts left out
    (a variant with fewer layers above k has the same bottom), the attention implementation in."""
    n = config.num_hidden_layers
    view = {name: value for name, value in config.to_dict().items()
            if name not in LAYER_COUNT_FIELDS + NOT_MODEL_FIELDS}  # fmt: skip
    for name, value in view.items():
        if isinstance(value, list) and len(value) == n and name != "eos_token_id":
            view[name] = value[:k]
    if isinstance(view.get("max_window_layers"), int):
        view["max_window_layers"] = min(view["max_window_layers"], k)
    view["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return view


def model_digest(model: nn.Module) -> str:
    """The whole model: every parameter and buffer with its name, dtype and module type, the
    config (all of it that bears on the forward), dtype and device kind."""
    config = model.config
    view = {name: value for name, value in config.to_dict().items() if name not in NOT_MODEL_FIELDS}
    view["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    head = {"device": next(model.parameters()).device.type, "dtype": str(model.dtype)}
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps([head, view], sort_keys=True, default=str).encode())
    digest.update(module_digest(model).encode())
    return digest.hexdigest()


def fingerprints(model: nn.Module, upto: int) -> list[str]:
    """`[fingerprint of layers below k for k in 0..upto]`: the stack's own tensors (embedding,
    rotary buffers; not the final norm), layers 0..k-1, `config_view(k)`, dtype, device kind."""
    stack, config = model.get_decoder(), model.config.get_text_config(decoder=True)
    layers = decoder_layers(model)
    stem = module_digest(stack, skip=("layers", "norm"))
    device = next(model.parameters()).device.type
    per_layer = [module_digest(layers[i]) for i in range(upto)]
    prints = []
    for k in range(upto + 1):
        digest = hashlib.blake2b(digest_size=20)
        head = {"stem": stem, "device": device, "dtype": str(model.dtype), "k": k}
        digest.update(
            json.dumps([head, config_view(config, k)], sort_keys=True, default=str).encode()
        )
        for layer in per_layer[:k]:
            digest.update(layer.encode())
        prints.append(digest.hexdigest())
    return prints
