"""Decoder-layer surgery: remove or merge decoder layers of a Hugging Face causal LM in place.

Every layer-compression method (reverse-order pruning, ShortGPT, angular distance, MKA) goes
through this module, so that the compressed model is still a valid Hugging Face model:

* ``forward`` and ``generate()`` with a KV cache give the same tokens as without a cache. The
  cache is indexed by each attention module's ``layer_idx`` (transformers issue 30508), so after
  a removal every ``layer_idx`` attribute inside the decoder layers is renumbered ``0..n-1``.
* The text config agrees with the layer stack: ``num_hidden_layers`` is the new count, per-layer
  lists (``layer_types`` and any other list as long as the old stack) keep the entries of the
  retained layers, lists of layer indices (``mlp_only_layers``) are remapped, and threshold
  fields (``max_window_layers``, ``decoder_sparse_step``) are rewritten so that a model rebuilt
  from the config has the same layers. Models read ``config.layer_types[i]`` in ``forward`` and
  the cache is built from the config, so a stale config would give wrong masks or cache layers.
* ``save_pretrained`` then ``from_pretrained`` rebuilds the same model with identical logits.

Merging (``merge_layers``) writes into the real parameters (the paper's public code wrote into
``model.state_dict()[key]`` tensors of a fresh dict, which left the model unchanged).

Indices always refer to the layers' current positions. Only ``SUPPORTED_MODEL_TYPES`` are
accepted: their config fields were checked against transformers' modeling code.

The last section holds the temporary machinery that scoring and repair share: layers swapped out
for the length of a block (``swapped_layers``), the stack above a layer as a model of its own
(``upper_layers``), forward pre-hooks that feed a layer another
hidden state (``with_hidden_input``, ``hooks_removed_after``), and the final hidden states of a
trimmed calibration batch. It lives here, below the stages, so that no method or repair imports
another's module to borrow it.

Floor 1: imports torch only, never a stage (methods, repair, quantizers, evaluation).
"""

from __future__ import annotations

import contextlib
import numbers
import operator
from collections.abc import Iterator, Sequence

import torch
from torch import nn

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3_text",
    "gemma3",
)
MERGE_SCOPES: tuple[str, ...] = ("all", "linear")

# Config lists whose values are layer indices (remapped, never sliced by position).
_INDEX_LIST_FIELDS: tuple[str, ...] = ("mlp_only_layers",)
# List-valued config fields that are never per-layer even when their length matches.
_NOT_PER_LAYER: frozenset[str] = frozenset({"architectures", "eos_token_id", "bos_token_id"})


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one whose layer surgery this module knows."""

    def __init__(self, model_type: str, reason: str = "not supported for layer surgery") -> None:
        self.model_type = model_type
        super().__init__(
            f"model_type {model_type!r}: {reason}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


# --------------------------------------------------------------------------- access


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder-layer ``ModuleList`` (``LlamaModel`` etc.)."""
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(model_type)
    inner = getattr(model, "model", None)
    # *ForCausalLM -> .model; gemma3 multimodal -> .model.language_model; a bare base model.
    candidates = (getattr(inner, "language_model", None), inner, model)
    for owner in candidates:
        if isinstance(getattr(owner, "layers", None), nn.ModuleList):
            return owner
    raise UnsupportedArchitectureError(model_type, "no decoder-layer list found")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a supported causal LM (the text decoder for gemma3)."""
    return _decoder_stack(model).layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def _text_config(model: nn.Module):
    """The config describing the decoder stack (``text_config`` for multimodal models)."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


# --------------------------------------------------------------------------- validation


def _as_index(value: object, n: int, what: str) -> int:
    """A layer position in ``range(n)``; bools and negative positions are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not a layer index; allowed range 0..{n - 1}")
    try:
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} {value!r} is not an integer; allowed range 0..{n - 1}") from None
    if not 0 <= index < n:
        raise ValueError(f"{what} {index} is out of range; allowed range 0..{n - 1}")
    return index


def _check_removal(indices: Sequence[int], n: int) -> list[int]:
    checked = [_as_index(i, n, "layer index") for i in indices]
    seen: set[int] = set()
    for index in checked:
        if index in seen:
            raise ValueError(f"layer index {index} is given twice; indices must be distinct")
        seen.add(index)
    if len(seen) == n:
        raise ValueError(f"cannot remove all {n} decoder layers (indices 0..{n - 1})")
    return checked


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    if not 0.0 <= lam <= 1.0:  # also refuses NaN
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    return float(lam)


def _check_scope(scope: str) -> None:
    if scope not in MERGE_SCOPES:
        raise ValueError(f"unknown merge scope {scope!r}; allowed: {set(MERGE_SCOPES)}")


# --------------------------------------------------------------------------- config


def _dense_layers_from_sparse_step(config, old_n: int) -> list[int] | None:
    """Qwen MoE: the rule ``(i + 1) % decoder_sparse_step == 0`` cannot survive renumbering, so
    the dense layers it implies are listed in ``mlp_only_layers`` and the step becomes 1."""
    step = getattr(config, "decoder_sparse_step", None)
    if not isinstance(step, int) or step <= 1 or not getattr(config, "num_experts", 0):
        return None
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    return sorted(dense | {i for i in range(old_n) if (i + 1) % step != 0})


def _per_layer_lists(config, retained: Sequence[int], old_n: int) -> dict[str, object]:
    """Every list field as long as the old stack (``layer_types`` ...), sliced to ``retained``."""
    sliced: dict[str, object] = {}
    for name, value in vars(config).items():
        skip = name.startswith("_") or name in _NOT_PER_LAYER or name in _INDEX_LIST_FIELDS
        if not skip and isinstance(value, (list, tuple)) and len(value) == old_n:
            sliced[name] = type(value)(value[i] for i in retained)
    return sliced


def _config_updates(config, retained: Sequence[int], old_n: int) -> dict[str, object]:
    """New values of every layer-count-dependent config field (pure: config is not changed)."""
    updates = _per_layer_lists(config, retained, old_n)
    index_lists = {
        name: list(getattr(config, name))
        for name in _INDEX_LIST_FIELDS
        if isinstance(getattr(config, name, None), (list, tuple))
    }
    dense = _dense_layers_from_sparse_step(config, old_n)
    if dense is not None:
        updates["decoder_sparse_step"] = 1
        index_lists["mlp_only_layers"] = dense
    new_of_old = {old: new for new, old in enumerate(retained)}
    for name, indices in index_lists.items():
        updates[name] = [new_of_old[i] for i in indices if i in new_of_old]
    window_layers = getattr(config, "max_window_layers", None)
    if isinstance(window_layers, int):  # "layers with index >= k use sliding attention"
        updates["max_window_layers"] = sum(1 for i in retained if i < window_layers)
    updates["num_hidden_layers"] = len(retained)
    return updates


# --------------------------------------------------------------------------- removal


def _renumber_layer_idx(layers: nn.ModuleList) -> None:
    """Set every ``layer_idx`` inside layer i to i: the KV cache is indexed by it."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(vars(module).get("layer_idx"), int):
                module.layer_idx = new_index


def _refresh_stack_flags(stack: nn.Module, config) -> None:
    # Qwen2/Qwen3 cache this at init; keep it what a reload would compute.
    if hasattr(stack, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
        stack.has_sliding_layers = "sliding_attention" in config.layer_types


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def _remap_device_map(model: nn.Module, prefix: str | None, retained: Sequence[int]) -> None:
    """Rename ``hf_device_map`` entries of moved layers (accelerate ``device_map``); drop removed."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict) or not prefix:
        return
    new_of_old = {old: new for new, old in enumerate(retained)}
    remapped = {}
    for key, device in device_map.items():
        head, sep, rest = key.partition(prefix + ".")
        index, dot, tail = rest.partition(".")
        if head or not sep or not index.isdigit():
            remapped[key] = device  # not a single layer's entry
        elif int(index) in new_of_old:
            remapped[f"{prefix}.{new_of_old[int(index)]}{dot}{tail}"] = device
    model.hf_device_map = remapped


def remove_layers(model: nn.Module, indices: Sequence[int]) -> None:
    """Remove the decoder layers at the given current positions, in place, and fix the config.

    Raises ValueError for an index out of range, a repeated index, or removing every layer;
    UnsupportedArchitectureError for a model type not in SUPPORTED_MODEL_TYPES.
    """
    stack = _decoder_stack(model)
    layers, config = stack.layers, _text_config(model)
    old_n = len(layers)
    removed = set(_check_removal(indices, old_n))
    retained = [i for i in range(old_n) if i not in removed]
    updates = _config_updates(config, retained, old_n)  # computed before anything changes
    prefix = _module_name(model, layers)
    for index in sorted(removed, reverse=True):
        del layers[index]  # ModuleList renames its children 0..n-1
    _renumber_layer_idx(layers)
    for name, value in updates.items():
        setattr(config, name, value)
    _refresh_stack_flags(stack, config)
    _remap_device_map(model, prefix, retained)


# --------------------------------------------------------------------------- merging


def _is_linear_weight(module: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Scope "linear": nn.Linear weights and biases, plus matrix parameters of other modules
    (fused MoE expert weights, routers), which are linear maps stored without nn.Linear."""
    owner = module.get_submodule(name.rpartition(".")[0])
    return isinstance(owner, nn.Linear) or (isinstance(tensor, nn.Parameter) and tensor.ndim >= 2)


def mergeable_tensors(module: nn.Module, scope: str) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``module`` in ``scope``, the live tensors, each once.

    Public because merges other than ``merge_params``'s convex blend (LaCo's RDSC sum) must blend
    the very same tensors: one definition of what "the layer's weights in scope" means.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied tensors must be blended once
            continue
        seen.add(id(tensor))
        if scope == "all" or _is_linear_weight(module, name, tensor):
            tensors[name] = tensor
    return tensors


def _merge_pairs(a: nn.Module, b: nn.Module, scope: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matching (a, b) tensors, all checked before any is changed."""
    mine, theirs = mergeable_tensors(a, scope), mergeable_tensors(b, scope)
    if mine.keys() != theirs.keys():
        differ = sorted(mine.keys() ^ theirs.keys())
        raise ValueError(f"modules have different parameters, cannot merge: {differ[:5]}")
    for name, tensor in mine.items():
        if tensor.shape != theirs[name].shape:
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)} != {tuple(theirs[name].shape)}, cannot merge"
            )
        if not (tensor.is_floating_point() and theirs[name].is_floating_point()):
            raise ValueError(f"{name}: merging needs floating-point tensors, got {tensor.dtype}")
    return [(tensor, theirs[name]) for name, tensor in mine.items()]


def _blend(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    # float32 (or wider) arithmetic so bf16/fp16 weights are rounded once, at the end.
    work = torch.promote_types(a.dtype, torch.float32)
    mixed = lam * a.to(work) + (1.0 - lam) * b.to(device=a.device, dtype=work)
    return mixed.to(a.dtype)


def merge_params(a: nn.Module, b: nn.Module, lam: float, scope: str = "all") -> None:
    """In place ``a <- lam * a + (1 - lam) * b`` for every tensor of ``a`` in ``scope``.

    scope "all": every parameter and persistent floating buffer (attention, MLP, norms);
    scope "linear": only linear-map weights and biases, norms untouched (the paper's code).
    """
    lam = _check_lam(lam)
    _check_scope(scope)
    pairs = _merge_pairs(a, b, scope)
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.copy_(_blend(mine, theirs, lam))


def merge_layers(model: nn.Module, keep: int, drop: int, lam: float, scope: str = "all") -> None:
    """Merge decoder layer ``drop`` into layer ``keep`` (current positions), then remove ``drop``.

    ``theta_keep <- lam * theta_keep + (1 - lam) * theta_drop``. The merged layer keeps layer
    ``keep``'s attention type; if ``drop < keep`` it ends up at position ``keep - 1``.
    """
    layers = decoder_layers(model)
    keep = _as_index(keep, len(layers), "keep")
    drop = _as_index(drop, len(layers), "drop")
    if keep == drop:
        raise ValueError(f"keep and drop are both {keep}; a layer cannot merge with itself")
    merge_params(layers[keep], layers[drop], lam, scope)
    remove_layers(model, [drop])


# ------------------------------------------------------------------- temporary swaps and hooks


class SkippedLayer(nn.Module):
    """Stands in for a decoder layer: hands its input on unchanged.

    Keeps the layer's ``attention_type``, so that families which read it in ``forward`` (Gemma,
    Qwen with sliding layers) build the same masks as with the layer in place.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if hasattr(layer, "attention_type"):  # read by some families' forward
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def swapped_layers(model, replacements: dict[int, nn.Module | None]) -> Iterator[None]:
    """Temporarily put `replacements[p]` at current position p (None: skip the layer there).

    Positions, and so the config's per-layer lists, stay as they are; the originals come back
    afterwards, even on error.
    """
    layers = decoder_layers(model)
    saved = {position: layers[position] for position in replacements}
    try:
        for position, module in replacements.items():
            layers[position] = module if module is not None else SkippedLayer(saved[position])
        yield
    finally:
        for position, module in saved.items():
            layers[position] = module


@contextlib.contextmanager
def upper_layers(model, start: int) -> Iterator[None]:
    """Temporarily the model as `remove_layers(model, range(start))` would leave it: layers
    `start..n-1` renumbered from 0, the config's per-layer lists sliced to them.

    Why: a model that has the hidden states entering layer `start` (`inputs_embeds`) runs the
    rest through its own forward, with its own masks, rotary embeddings and a KV cache of one
    entry per upper layer. The stack, the config and every `layer_idx` come back afterwards.
    """
    stack, config = _decoder_stack(model), _text_config(model)
    layers, n = stack.layers, len(stack.layers)
    start = _as_index(start, n, "start layer")
    retained = list(range(start, n))
    updates = _config_updates(config, retained, n)
    saved = {name: getattr(config, name) for name in updates}
    numbered = [  # only the retained layers are renumbered: their numbers come back after
        (m, m.layer_idx)
        for layer in layers[start:]
        for m in layer.modules()
        if isinstance(vars(m).get("layer_idx"), int)
    ]
    flag = vars(stack).get("has_sliding_layers")
    try:
        stack.layers = nn.ModuleList(layers[start:])
        _renumber_layer_idx(stack.layers)
        for name, value in updates.items():
            setattr(config, name, value)
        _refresh_stack_flags(stack, config)
        yield
    finally:
        stack.layers = layers
        for name, value in saved.items():
            setattr(config, name, value)
        for module, index in numbered:
            module.layer_idx = index
        if flag is not None:
            stack.has_sliding_layers = flag


def with_hidden_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A layer's forward-pre-hook arguments with `hidden` in place of its hidden-states input."""
    old = args[0] if args else kwargs["hidden_states"]
    hidden = hidden.to(old.device, old.dtype)
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


@contextlib.contextmanager
def hooks_removed_after(handles: list) -> Iterator[None]:
    """Remove the forward hooks in `handles` when the block ends, even on error."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trimmed_batch(batch: dict, device) -> dict:
    """`batch` cut to its longest prompt (trailing columns that are pad in every row dropped)
    and moved to `device`: padding the whole calibration set to one width costs forward time."""
    used = batch["attention_mask"].bool().any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return {name: tensor[:, :width].to(device) for name, tensor in batch.items()}


def final_hidden_states(model, batch: dict) -> torch.Tensor:
    """The decoder stack's output after the final norm, [b, T, D] (what the LM head reads)."""
    out = model.base_model(**batch, use_cache=False)
    return out.last_hidden_state
