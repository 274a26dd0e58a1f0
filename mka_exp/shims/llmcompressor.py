"""llm-compressor's `oneshot` on an in-memory model: the adapter that SparseGPT
(`mka_exp.methods.sparsegpt`) and the quantizers (`mka_exp.quantizers.llmcompressor`) share, so
that neither stage imports the other, with the workarounds it needs kept apart from their logic.

`run_oneshot` feeds the calibration prompts one unpadded row at a time and leaves the model a
plain module on its device; `matched_modules` is llm-compressor's own target/ignore matching (what
a recipe will touch, for the stats). Imports torch, llm-compressor and compressed-tensors only
(those two lazily: they are slow to import and only needed for a run).

**Two llm-compressor 0.14 quirks handled here** (both only for in-memory models on CPU):
`oneshot` re-reads the config from `model.config.name_or_path`, which a model built from a config
or loaded from a GGUF does not have — we point it at a temporary copy of the live config; and
AWQ pins its cached activations in page-locked memory, which torch refuses without an
accelerator ("Cannot access accelerator device") — pinning only speeds host-to-device copies, so
without an accelerator we make it a no-op for the duration of the call.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch


class PromptRows(Protocol):
    """What the runner reads of a calibration set (`mka_exp.calibration.CalibrationSet`, a floor
    above the shims): padded token rows and their masks, one per prompt."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int: ...


def matched_modules(
    model: torch.nn.Module, targets: Sequence[str], ignore: Sequence[str]
) -> dict[str, torch.nn.Module]:
    """The modules a modifier will change, by llm-compressor's own target/ignore matching."""
    from compressed_tensors.utils import match_named_modules

    return dict(match_named_modules(model, list(targets), list(ignore)))


@contextmanager
def config_on_disk(model: torch.nn.Module) -> Iterator[None]:
    """Point `config.name_or_path` at a temporary copy of the live config during `oneshot`.

    llm-compressor 0.14's `Oneshot.validate_model` reloads the config from `name_or_path` to
    check for an existing quantization config; a model built from a config has none ('') and
    a GGUF-loaded one points at a folder without config.json. The copy is the live config, so
    the check still sees the model's real quantization state.
    """
    config = model.config
    original = config.name_or_path
    with tempfile.TemporaryDirectory(prefix="mka_oneshot_config_") as tmp:
        config.save_pretrained(tmp)
        config.name_or_path = tmp
        try:
            yield
        finally:
            config.name_or_path = original


@contextmanager
def no_pinning_without_accelerator() -> Iterator[None]:
    """Make llm-compressor's `IntermediatesCache.pin_memory` a no-op when there is no accelerator.

    AWQ pins its cached layer inputs before the grid search (`_apply_smoothing`), and
    `Tensor.pin_memory()` raises "Cannot access accelerator device when none is available" on a
    CPU-only machine. Pinned memory only speeds host-to-device copies, of which there are none
    here, so skipping it changes nothing else. With an accelerator this does nothing.
    """
    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def calibration_loader(
    calib: PromptRows, num_samples: int | None = None, max_seq_length: int | None = None
):
    """The first `num_samples` prompts, one per batch, unpadded (and cut to `max_seq_length`).

    Batches of one neither pad (pad tokens would enter the Hessians of GPTQ / SparseGPT) nor
    truncate (llm-compressor's default collator cuts a batch to its shortest row).
    """
    from torch.utils.data import DataLoader

    n = len(calib) if num_samples is None else min(num_samples, len(calib))
    batches = []
    for ids, mask in zip(calib.input_ids[:n], calib.attention_mask[:n], strict=True):
        row = ids[mask.bool()][:max_seq_length].unsqueeze(0)
        batches.append({"input_ids": row, "attention_mask": torch.ones_like(row)})
    return DataLoader(batches, batch_size=None)  # items are already batches


class PretokenizedData:
    """Stands in for `oneshot`'s processor when the caller has no tokenizer.

    `oneshot` insists on a processor whenever calibration data is given, but with a ready
    DataLoader it never uses it (it would only tokenize a text dataset or save beside the model).
    """


def run_oneshot(
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: list,
    calib: PromptRows | None,
    num_calibration_samples: int | None = None,
    max_seq_length: int | None = None,
) -> None:
    """llm-compressor's `oneshot` on the in-memory model (in place), calibration rows in order."""
    from llmcompressor import oneshot

    kwargs: dict[str, Any] = {}
    if calib is not None:
        kwargs["dataset"] = calibration_loader(calib, num_calibration_samples, max_seq_length)
        kwargs["processor"] = tokenizer if tokenizer is not None else PretokenizedData()
    from compressed_tensors.offload import OffloadCache
    from compressed_tensors.offload.dispatch import remove_dispatch

    was_offloaded = any(isinstance(m._parameters, OffloadCache) for m in model.modules())
    with config_on_disk(model), no_pinning_without_accelerator():
        oneshot(model=model, recipe=recipe, **kwargs)
    if not was_offloaded:
        # The sequential pipeline wraps every module in compressed-tensors offloading (onload
        # on each forward); undo it so the model is a plain module on its device again.
        remove_dispatch(model)
