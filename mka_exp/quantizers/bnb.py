"""bitsandbytes load-time quantization: LLM.int8() and 4-bit NF4 (needs a CUDA GPU).

**LLM.int8()** (Dettmers et al., 2022, https://arxiv.org/abs/2208.07339): int8 weights with
per-row absmax scales; at inference the few activation feature dimensions with outliers above
`threshold` are multiplied in fp16 (mixed-precision decomposition), the rest in int8.
**NF4** (QLoRA, Dettmers et al., 2023, https://arxiv.org/abs/2305.14314): 4-bit NormalFloat,
quantiles of a normal distribution as the 16 levels, absmax scales per block of 64 weights,
optionally double-quantized scales. No calibration data for either.

bitsandbytes quantizes while loading, so `quantize` saves the (compressed) model to a temporary
directory and reloads it with a `BitsAndBytesConfig`: the returned model is a new object (the
original is moved to CPU to free GPU memory). Example `conf/quant/bnb_nf4.yaml`::

    _target_: mka_exp.quantizers.bnb.BnbNF4
    compute_dtype: bfloat16
    double_quant: false

Without CUDA or the `bitsandbytes` package, constructing either class raises one RuntimeError
naming the config, so a run fails before it loads or compresses anything.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from typing import Any, ClassVar

import torch

from mka_exp.calibration import CalibrationSet

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def require_bitsandbytes(config_name: str) -> None:
    """Raise one clear RuntimeError unless a CUDA GPU and the bitsandbytes package are present."""
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("the bitsandbytes package is not installed (pip install 'mka-exp[gpu]')")
    if problems:
        raise RuntimeError(
            f"quant={config_name}: bitsandbytes needs a CUDA GPU; here {' and '.join(problems)}. "
            "On CPU use quant=none, rtn, gptq, awq or smoothquant."
        )


class Bitsandbytes:
    """Shared save → reload-with-`BitsAndBytesConfig` path of the two bitsandbytes quantizers."""

    config_name: ClassVar[str]
    bits: ClassVar[int]
    group_size: ClassVar[int | None]

    def __init__(self) -> None:
        require_bitsandbytes(self.config_name)

    def quantization_config(self):
        raise NotImplementedError

    def load_dtype(self) -> torch.dtype:
        return torch.float16

    def quantize(
        self, model: torch.nn.Module, tokenizer: Any, calib: CalibrationSet | None
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Return a bitsandbytes-quantized copy of `model` on the current CUDA device."""
        from transformers import AutoModelForCausalLM

        require_bitsandbytes(self.config_name)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mka_bnb_") as tmp:
            model.save_pretrained(tmp)
            model.to("cpu")  # the caller uses the returned model; free the GPU for it
            quantized = AutoModelForCausalLM.from_pretrained(
                tmp,
                quantization_config=self.quantization_config(),
                device_map={"": torch.cuda.current_device()},
                dtype=self.load_dtype(),
            )
        quantized.eval()
        return quantized, {
            "algorithm": "bitsandbytes",
            "scheme": self.config_name,
            "bits": self.bits,
            "group_size": self.group_size,
            "seconds": round(time.perf_counter() - start, 3),
            "memory_footprint_bytes": int(quantized.get_memory_footprint()),
        }


class BnbInt8(Bitsandbytes):
    """LLM.int8(): int8 weights (per-row scales), fp16 outlier decomposition above `threshold`."""

    config_name = "bnb_int8"
    bits = 8
    group_size = None

    def __init__(self, threshold: float = 6.0) -> None:
        if threshold < 0:
            raise ValueError(f"bnb_int8: threshold={threshold} must be >= 0")
        self.threshold = threshold
        super().__init__()

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.threshold)


class BnbNF4(Bitsandbytes):
    """4-bit NormalFloat weights (blocks of 64), matmuls in `compute_dtype`."""

    config_name = "bnb_nf4"
    bits = 4
    group_size = 64

    def __init__(self, compute_dtype: str = "bfloat16", double_quant: bool = False) -> None:
        if compute_dtype not in DTYPES:
            raise ValueError(
                f"bnb_nf4: compute_dtype={compute_dtype!r} is not supported; allowed: {list(DTYPES)}"
            )
        self.compute_dtype = compute_dtype
        self.double_quant = double_quant
        super().__init__()

    def load_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
            bnb_4bit_use_double_quant=self.double_quant,
        )
