"""Size bookkeeping for a compressed (and maybe quantized) model.

The paper's compression ratio (MKA, arXiv 2406.16330, Table 1) folds layer removal and weight
quantization into one number: with Q = 16 / bits,

    ratio = (L_total - L_retained / Q) / L_total

e.g. 32 layers, 18 kept, int4 weights: (32 - 18 / 4) / 32 = 0.859375. Beside it the pipeline
records the true parameter count and (when saved) bytes on disk.

Note: the paper's Table 1 gives SmoothQuant (W8A8) rows the same ratio as GPTQ / AWQ (int4),
i.e. it used Q = 4 for every quantizer. The pipeline passes each quantizer's own `bits`, so
SmoothQuant gets Q = 2 here (0.71875 for 18 of 32 layers, where the paper prints 0.859).
"""

from __future__ import annotations

import torch


def paper_compression_ratio(total_layers: int, retained_layers: int, bits: int) -> float:
    """(L_total − L_retained/Q)/L_total with Q = 16/bits; bits=16 gives the plain layer ratio."""
    if total_layers <= 0:
        raise ValueError(f"total_layers={total_layers} must be > 0")
    if not 0 <= retained_layers <= total_layers:
        raise ValueError(f"retained_layers={retained_layers} must be in [0, {total_layers}]")
    if not 0 < bits <= 16:
        raise ValueError(f"bits={bits} must be in (0, 16]")
    q = 16 / bits
    return (total_layers - retained_layers / q) / total_layers


QUANT_BOOKKEEPING = ("_scale", "_zero_point", "_g_idx", "_shape", "_global_scale")


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct model weights (tied embeddings once), whatever their storage.

    Quantization bookkeeping (compressed-tensors' `*_scale`, `*_zero_point`, `*_g_idx`) is not
    counted, and a bitsandbytes 4-bit weight counts its logical shape, not its packed bytes.
    """
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.endswith(QUANT_BOOKKEEPING):
            continue
        seen.add(id(p))
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += shape.numel() if shape is not None else p.numel()
    return total


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside the decoder stack (not the embeddings, not the lm_head)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        return {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name
        }
    return {
        f"model.layers.{name}": m
        for name, m in layers.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of exactly-zero weights among the decoder Linear weights (0.0 if there are none)."""
    zeros = total = 0
    for module in decoder_linears(model).values():
        w = module.weight
        if w.is_meta or not w.dtype.is_floating_point:
            continue  # packed / quantized storage (bitsandbytes int8, nf4): not countable here
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0
