"""Post-training quantizers run through llm-compressor's `oneshot`, recipes built from plain args.

Each class takes plain arguments (bits, group size, ...), builds an llm-compressor recipe, and
quantizes the model in place on the calibration set. The model afterwards carries
compressed-tensors quantization schemes: its forward pass fake-quantizes (so lm-eval sees the
quantized model), and `mka_exp.models.saving.save_compressed` writes a packed compressed-tensors
checkpoint that `AutoModelForCausalLM.from_pretrained` reloads.

**SmoothQuant** (Xiao et al., 2022, https://arxiv.org/abs/2211.10438). Activations of LLMs have a
few outlier channels that make 8-bit activation quantization lossy, while weights are easy to
quantize. SmoothQuant migrates that difficulty offline: per input channel j it divides the
activations by s_j = max|X_j|^α / max|W_j|^(1−α) and multiplies the matching weight rows by
s_j (folded into the preceding norm / projection), an exact re-parametrisation. Then weights
(per output channel) and activations (per token, dynamic) are both quantized to int8: W8A8.
Example `conf/quant/smoothquant.yaml`::

    _target_: mka_exp.quantizers.llmcompressor.SmoothQuant
    bits: 8
    smoothing_strength: 0.8
    weight_method: rtn

**GPTQ** (Frantar et al., 2022, https://arxiv.org/abs/2210.17323). Quantizes a layer's weight
matrix one column at a time and, using the inverse Hessian H = 2XXᵀ of the layer's inputs on
calibration data, updates the not-yet-quantized columns to compensate each column's rounding
error (optimal brain surgeon, solved with a Cholesky factor, in blocks). Weight-only: W4A16 or
W8A16 with per-group scales. Example `conf/quant/gptq.yaml`::

    _target_: mka_exp.quantizers.llmcompressor.GPTQ
    bits: 4
    group_size: auto

**AWQ** (Lin et al., 2023, https://arxiv.org/abs/2306.00978). Activation-aware weight
quantization: the ~1% of weight channels that see large activations matter most. Rather than
keeping them in high precision, AWQ scales those input channels up before quantization (and the
preceding op down), with the per-channel scale s = s_X^α chosen by a grid search over α that
minimises the layer's output error on calibration data. Then plain group-wise round-to-nearest,
asymmetric (with zero point) by default: W4A16. Example `conf/quant/awq.yaml`::

    _target_: mka_exp.quantizers.llmcompressor.AWQ
    bits: 4
    group_size: auto

**RTN**: group-wise round-to-nearest with min-max scales, no calibration data: the baseline that
GPTQ and AWQ improve on. Example `conf/quant/rtn.yaml`::

    _target_: mka_exp.quantizers.llmcompressor.RTN
    bits: 4
    group_size: auto

**Group size.** Group-wise scales need the group size to divide every quantized Linear's
`in_features` (SmolLM2-135M has hidden 576, not a multiple of 128). `group_size: auto` picks the
largest of 128, 64, 32, 16, 8 dividing all of them (per-channel scales if none does) and reports
it in the stats; an explicit group size that does not divide raises ValueError.

The run itself (`run_oneshot`, shared with `mka_exp.methods.sparsegpt`) and the two
llm-compressor 0.14 workarounds it needs live in `mka_exp.shims.llmcompressor`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mka_exp.calibration import CalibrationSet
from mka_exp.shims.llmcompressor import matched_modules, run_oneshot

log = logging.getLogger(__name__)

AUTO_GROUP_SIZES = (128, 64, 32, 16, 8)
SCHEME_RE = re.compile(r"^W(\d+)A(\d+)(_ASYM)?$")


def check_group_size(group_size: Any) -> None:
    """`auto`, None / -1 (per channel) or a positive int; the model decides if it divides."""
    if group_size in ("auto", None, -1):
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"quant.group_size={group_size!r} is not supported; use auto, a positive int, "
            "or null (per-channel)"
        )


def resolve_group_size(
    model: torch.nn.Module,
    group_size: int | str | None,
    targets: Sequence[str] = ("Linear",),
    ignore: Sequence[str] = ("lm_head",),
) -> int | None:
    """`auto` → largest of 128, 64, ... dividing every quantized in_features (None: per-channel).

    None or -1 means per-channel scales. An explicit size must divide every quantized width.
    """
    modules = matched_modules(model, targets, ignore)
    if not modules:
        raise ValueError(f"no module matches quant targets={list(targets)} (ignore={list(ignore)})")
    widths = {name: int(m.weight.shape[-1]) for name, m in modules.items()}
    if group_size is None or group_size == -1:
        return None
    if group_size == "auto":
        for size in AUTO_GROUP_SIZES:
            if all(w % size == 0 for w in widths.values()):
                return size
        log.warning(
            "group_size=auto: none of %s divides all in_features %s; using per-channel scales",
            AUTO_GROUP_SIZES,
            sorted(set(widths.values())),
        )
        return None
    check_group_size(group_size)
    for name, width in widths.items():
        if width % group_size:
            raise ValueError(
                f"quant.group_size={group_size} does not divide in_features={width} of {name}; "
                "use group_size=auto, a divisor of every width, or null (per-channel)"
            )
    return group_size


def parse_scheme(scheme: str) -> tuple[int, int, bool]:
    """'W4A16_ASYM' → (weight bits 4, activation bits 16, symmetric False)."""
    match = SCHEME_RE.match(str(scheme))
    if not match:
        raise ValueError(f"quant.scheme={scheme!r} is not a scheme name like W4A16 or W4A16_ASYM")
    return int(match.group(1)), int(match.group(2)), match.group(3) is None


class LLMCompressorQuantizer:
    """Shared argument checks, group-size resolution, timing and stats."""

    algorithm: ClassVar[str]
    allowed_schemes: ClassVar[tuple[str, ...]]
    needs_calibration: ClassVar[bool] = True
    grouped: ClassVar[bool] = True  # weight scales per group (else per output channel)

    def __init__(
        self,
        bits: int,
        scheme: str | None,
        symmetric: bool,
        group_size: int | str | None,
        targets: Sequence[str],
        ignore: Sequence[str],
        num_calibration_samples: int | None,
        max_seq_length: int | None,
    ) -> None:
        allowed_bits = sorted({parse_scheme(s)[0] for s in self.allowed_schemes})
        if bits not in allowed_bits:
            raise ValueError(
                f"{self.algorithm}: bits={bits!r} is not supported; allowed: {allowed_bits}"
            )
        if scheme is None:
            scheme = self.scheme_name(bits, symmetric)
        if scheme not in self.allowed_schemes:
            raise ValueError(
                f"{self.algorithm}: unknown scheme {scheme!r}; allowed: {list(self.allowed_schemes)}"
            )
        scheme_bits, self.activation_bits, self.symmetric = parse_scheme(scheme)
        if scheme_bits != bits:
            raise ValueError(f"{self.algorithm}: scheme={scheme!r} contradicts bits={bits}")
        if num_calibration_samples is not None and num_calibration_samples < 1:
            raise ValueError(f"num_calibration_samples={num_calibration_samples} must be >= 1")
        if self.grouped:
            check_group_size(group_size)
        self.bits = bits
        self.scheme = scheme
        self.group_size = group_size
        self.targets = list(targets)
        self.ignore = list(ignore)
        self.num_calibration_samples = num_calibration_samples
        self.max_seq_length = max_seq_length

    def scheme_name(self, bits: int, symmetric: bool) -> str:
        return f"W{bits}A16" + ("" if symmetric else "_ASYM")

    def weight_args(self, group_size: int | None):
        from compressed_tensors.quantization import QuantizationArgs

        if group_size is None:
            return QuantizationArgs(
                num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="channel"
            )
        return QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy="group",
            group_size=group_size,
        )

    def config_groups(self, group_size: int | None) -> dict:
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme(targets=self.targets, weights=self.weight_args(group_size))
        return {"group_0": scheme}

    def recipe(self, group_size: int | None) -> list:
        raise NotImplementedError

    def extra_stats(self) -> dict[str, Any]:
        return {}

    def quantize(
        self, model: torch.nn.Module, tokenizer: Any, calib: CalibrationSet | None
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Quantize `model` in place; return it and the stats for the run record."""
        if self.needs_calibration and calib is None:
            raise ValueError(f"{self.algorithm} needs calibration data (calib=None given)")
        group_size = None
        if self.grouped:
            group_size = resolve_group_size(model, self.group_size, self.targets, self.ignore)
        modules = matched_modules(model, self.targets, self.ignore)
        start = time.perf_counter()
        run_oneshot(
            model,
            tokenizer,
            self.recipe(group_size),
            calib if self.needs_calibration else None,
            self.num_calibration_samples,
            self.max_seq_length,
        )
        seconds = time.perf_counter() - start
        used = None
        if self.needs_calibration and calib is not None:
            used = len(calib)
            if self.num_calibration_samples is not None:
                used = min(used, self.num_calibration_samples)
        return model, {
            "algorithm": self.algorithm,
            "scheme": self.scheme,
            "bits": self.bits,
            "activation_bits": self.activation_bits,
            "symmetric": self.symmetric,
            "group_size": group_size,
            "group_size_requested": self.group_size if self.grouped else None,
            "quantized_modules": len(modules),
            "calibration_samples": used,
            "seconds": round(seconds, 3),
            **self.extra_stats(),
        }


class GPTQ(LLMCompressorQuantizer):
    """GPTQ weight-only quantization (W4A16 / W8A16), llm-compressor's `GPTQModifier`."""

    algorithm = "gptq"
    allowed_schemes = ("W4A16", "W4A16_ASYM", "W8A16", "W8A16_ASYM")

    def __init__(
        self,
        bits: int = 4,
        group_size: int | str | None = "auto",
        symmetric: bool = True,
        scheme: str | None = None,
        block_size: int = 128,
        dampening_frac: float = 0.01,
        actorder: str | None = "static",
        targets: Sequence[str] = ("Linear",),
        ignore: Sequence[str] = ("lm_head",),
        num_calibration_samples: int | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        super().__init__(
            bits,
            scheme,
            symmetric,
            group_size,
            targets,
            ignore,
            num_calibration_samples,
            max_seq_length,
        )
        orders = (None, "static", "group", "weight")
        if actorder not in orders:
            raise ValueError(f"gptq: actorder={actorder!r} is not supported; allowed: {orders}")
        if not 0 <= dampening_frac < 1:
            raise ValueError(f"gptq: dampening_frac={dampening_frac} must be in [0, 1)")
        self.block_size = block_size
        self.dampening_frac = dampening_frac
        self.actorder = actorder

    def recipe(self, group_size: int | None) -> list:
        from llmcompressor.modifiers.gptq import GPTQModifier

        kwargs = {} if self.actorder == "static" else {"actorder": self.actorder}
        return [
            GPTQModifier(
                config_groups=self.config_groups(group_size),
                ignore=self.ignore,
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
                **kwargs,
            )
        ]

    def extra_stats(self) -> dict[str, Any]:
        return {"actorder": self.actorder, "dampening_frac": self.dampening_frac}


class RTN(LLMCompressorQuantizer):
    """Round-to-nearest weight-only quantization, no calibration data (`QuantizationModifier`)."""

    algorithm = "rtn"
    allowed_schemes = ("W4A16", "W4A16_ASYM", "W8A16", "W8A16_ASYM")
    needs_calibration = False

    def __init__(
        self,
        bits: int = 4,
        group_size: int | str | None = "auto",
        symmetric: bool = True,
        scheme: str | None = None,
        targets: Sequence[str] = ("Linear",),
        ignore: Sequence[str] = ("lm_head",),
    ) -> None:
        super().__init__(bits, scheme, symmetric, group_size, targets, ignore, None, None)

    def recipe(self, group_size: int | None) -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [
            QuantizationModifier(config_groups=self.config_groups(group_size), ignore=self.ignore)
        ]


class AWQ(LLMCompressorQuantizer):
    """AWQ (W4A16, asymmetric by default): llm-compressor's AWQ transform, then group-wise RTN."""

    algorithm = "awq"
    allowed_schemes = ("W4A16", "W4A16_ASYM", "W8A16", "W8A16_ASYM")

    def __init__(
        self,
        bits: int = 4,
        group_size: int | str | None = "auto",
        symmetric: bool = False,
        scheme: str | None = None,
        duo_scaling: bool | str = True,
        n_grid: int = 20,
        targets: Sequence[str] = ("Linear",),
        ignore: Sequence[str] = ("lm_head",),
        num_calibration_samples: int | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        super().__init__(
            bits,
            scheme,
            symmetric,
            group_size,
            targets,
            ignore,
            num_calibration_samples,
            max_seq_length,
        )
        if duo_scaling not in (True, False, "both"):
            raise ValueError(f"awq: duo_scaling={duo_scaling!r} must be true, false or both")
        if n_grid < 4:  # llm-compressor divides by n_grid - 2 (by n_grid / 2 - 1 for "both")
            raise ValueError(f"awq: n_grid={n_grid} must be >= 4")
        self.duo_scaling = duo_scaling
        self.n_grid = n_grid

    def recipe(self, group_size: int | None) -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [
            AWQModifier(duo_scaling=self.duo_scaling, n_grid=self.n_grid),
            QuantizationModifier(config_groups=self.config_groups(group_size), ignore=self.ignore),
        ]

    def extra_stats(self) -> dict[str, Any]:
        return {"duo_scaling": self.duo_scaling, "n_grid": self.n_grid}


class SmoothQuant(LLMCompressorQuantizer):
    """SmoothQuant W8A8: smoothing, then int8 weights (per channel) and int8 dynamic activations.

    `weight_method`: `rtn` (the SmoothQuant paper's per-channel round-to-nearest) or `gptq`
    (llm-compressor's W8A8 example recipe).
    """

    algorithm = "smoothquant"
    allowed_schemes = ("W8A8",)
    grouped = False

    def __init__(
        self,
        bits: int = 8,
        scheme: str | None = None,
        smoothing_strength: float = 0.8,
        weight_method: str = "rtn",
        targets: Sequence[str] = ("Linear",),
        ignore: Sequence[str] = ("lm_head",),
        num_calibration_samples: int | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        super().__init__(
            bits, scheme, True, None, targets, ignore, num_calibration_samples, max_seq_length
        )
        if not 0 < smoothing_strength < 1:
            raise ValueError(
                f"smoothquant: smoothing_strength={smoothing_strength} must be in (0, 1)"
            )
        if weight_method not in ("rtn", "gptq"):
            raise ValueError(
                f"smoothquant: weight_method={weight_method!r} is not supported; allowed: rtn, gptq"
            )
        self.smoothing_strength = smoothing_strength
        self.weight_method = weight_method

    def scheme_name(self, bits: int, symmetric: bool) -> str:
        return f"W{bits}A{bits}"

    def recipe(self, group_size: int | None) -> list:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        quant = GPTQModifier if self.weight_method == "gptq" else QuantizationModifier
        return [
            SmoothQuantModifier(smoothing_strength=self.smoothing_strength),
            quant(targets=self.targets, scheme=self.scheme, ignore=self.ignore),
        ]

    def extra_stats(self) -> dict[str, Any]:
        return {"smoothing_strength": self.smoothing_strength, "weight_method": self.weight_method}
