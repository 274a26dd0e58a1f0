"""SparseGPT: one-shot unstructured or N:M weight pruning (a baseline beside layer removal).

SparseGPT (Frantar & Alistarh, 2023, https://arxiv.org/abs/2301.00774) prunes each Linear layer
to a target sparsity in one shot, with no retraining, by solving the layer-wise reconstruction
problem min ‖WX − ŴX‖² approximately: it walks over the weight columns in blocks, picks the
weights to drop by the OBS saliency w² / [H⁻¹]²_jj (H = XXᵀ from calibration inputs, dampened),
and updates the remaining weights of each row with the inverse Hessian to compensate the error.
The same machinery gives semi-structured N:M masks (2:4 keeps 2 of every 4 consecutive input
weights, which sparse tensor cores accelerate). Here it runs through llm-compressor's
`SparseGPTModifier` and `oneshot` (through `mka_exp.shims.llmcompressor`, the runner the
quantizers use too) on the calibration set, decoder layer by decoder layer. Layers
stay in place, so the paper's layer-based compression ratio does not apply; the run record has
`zero_fraction` and this method's achieved sparsity instead.

Example config (`conf/method/sparsegpt.yaml`)::

    _target_: mka_exp.methods.sparsegpt.SparseGPT
    ratio: 0.5            # fraction of weights zeroed per Linear, in [0, 1)
    mask_structure: "0:0" # unstructured; "2:4" for 2:4 semi-structured (ratio must be 0.5)
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from mka_exp.calibration import CalibrationSet
from mka_exp.shims.llmcompressor import matched_modules, run_oneshot


def parse_mask_structure(mask_structure: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in str(mask_structure).split(":"))
    except ValueError:
        n = m = -1
    if (n, m) != (0, 0) and not 0 < n < m:
        raise ValueError(
            f"method.mask_structure={mask_structure!r} is not supported; use '0:0' "
            "(unstructured) or 'N:M' with 0 < N < M, e.g. '2:4'"
        )
    return n, m


def sparsity_of(modules: dict[str, torch.nn.Module]) -> dict[str, float]:
    return {name: float((m.weight == 0).float().mean()) for name, m in modules.items()}


class SparseGPT:
    """Prune every targeted Linear to `ratio` sparsity (or N:M) with SparseGPT, in place."""

    def __init__(
        self,
        ratio: float = 0.5,
        mask_structure: str = "0:0",
        block_size: int = 128,
        dampening_frac: float = 0.01,
        targets: Sequence[str] = ("Linear",),
        ignore: Sequence[str] = ("lm_head",),
        num_calibration_samples: int | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"method.ratio={ratio!r} (sparsity) must be in [0, 1)")
        n, m = parse_mask_structure(mask_structure)
        if n and abs(ratio - n / m) > 1e-9:
            raise ValueError(
                f"method.mask_structure={mask_structure!r} zeroes exactly {n}/{m} of the weights; "
                f"set method.ratio={n / m} (got {ratio})"
            )
        if block_size < 1:
            raise ValueError(f"method.block_size={block_size} must be >= 1")
        if not 0 <= dampening_frac < 1:
            raise ValueError(f"method.dampening_frac={dampening_frac} must be in [0, 1)")
        if num_calibration_samples is not None and num_calibration_samples < 1:
            raise ValueError(
                f"method.num_calibration_samples={num_calibration_samples} must be >= 1"
            )
        self.ratio = float(ratio)
        self.mask_structure = f"{n}:{m}"
        self.block_size = block_size
        self.dampening_frac = dampening_frac
        self.targets = list(targets)
        # SparseGPTModifier names a module `<matched target>.` ("lm_head."), so a bare "lm_head"
        # never matches its ignore list: use the "re:.*lm_head" form its warning recommends.
        self.ignore = [x if x.startswith("re:") else f"re:.*{re.escape(x)}" for x in ignore]
        self.num_calibration_samples = num_calibration_samples
        self.max_seq_length = max_seq_length

    def recipe(self) -> list:
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return [
            SparseGPTModifier(
                sparsity=self.ratio,
                mask_structure=self.mask_structure,
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
                targets=self.targets,
                ignore=self.ignore,
            )
        ]

    def compress(self, model: torch.nn.Module, calib: CalibrationSet | None) -> dict[str, Any]:
        """Prune in place on the calibration prompts; return achieved sparsity stats."""
        if calib is None:
            raise ValueError("sparsegpt needs calibration data (calib=None given)")
        modules = matched_modules(model, self.targets, self.ignore)
        if not modules:
            raise ValueError(f"no module matches method.targets={self.targets}")
        start = time.perf_counter()
        if self.ratio > 0:
            run_oneshot(
                model,
                None,
                self.recipe(),
                calib,
                self.num_calibration_samples,
                self.max_seq_length,
            )
        seconds = time.perf_counter() - start
        per_module = sparsity_of(modules)
        zeros = sum(float((m.weight == 0).sum()) for m in modules.values())
        total = sum(m.weight.numel() for m in modules.values())
        return {
            "target_sparsity": self.ratio,
            "mask_structure": self.mask_structure,
            "sparsity": zeros / total,
            "sparsity_min": min(per_module.values()),
            "sparsity_max": max(per_module.values()),
            "pruned_modules": len(modules),
            "calibration_samples": min(len(calib), self.num_calibration_samples or len(calib)),
            "seconds": round(seconds, 3),
        }
