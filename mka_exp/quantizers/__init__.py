"""Quantizers applied after compression (the paper's Table 1 runs MKA or ShortGPT, then quantizes).

A quantizer is instantiated by Hydra from `conf/quant/<name>.yaml` and has
`quantize(model, tokenizer, calib) -> (model, stats)` plus `bits` (weight bits, 16 for none) for
the paper's compression ratio. llm-compressor ones (SmoothQuant, GPTQ, AWQ, RTN) live in
`mka_exp.quantizers.llmcompressor`, bitsandbytes ones (int8, nf4) in `mka_exp.quantizers.bnb`;
those modules import their libraries lazily. The contract is `Quantizer` in `mka_exp.contracts`;
running llm-compressor (shared with SparseGPT) is `mka_exp.shims.llmcompressor`.

Floor 3, a stage: imports the floors below (calibration, shims), never another stage.
"""

from __future__ import annotations

from typing import Any

import torch

from mka_exp.calibration import CalibrationSet
from mka_exp.quantizers.accounting import paper_compression_ratio, parameter_count, zero_fraction


class NoQuant:
    """No quantization: the model is returned unchanged, 16-bit weights for the accounting."""

    bits = 16

    def quantize(
        self, model: torch.nn.Module, tokenizer: Any, calib: CalibrationSet | None
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        return model, {"scheme": "none", "bits": self.bits, "group_size": None, "seconds": 0.0}


__all__ = ["NoQuant", "paper_compression_ratio", "parameter_count", "zero_fraction"]
