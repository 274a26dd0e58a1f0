"""One-pass capture of every decoder layer's hidden states on calibration prompts, cached on disk.

`capture_hidden_states` returns a tensor ``[L+1, n, D]`` (float32, CPU): index 0 is the input of
layer 0 (the embeddings as the first layer sees them, e.g. Gemma's scaled embeddings) and index
``i+1`` is the output of layer ``i``. Every layer is captured with forward hooks during ONE forward
pass per batch, and the pass stops right after the last decoder layer (no final norm, no LM head).

Why hooks and not ``output_hidden_states``: in transformers 5.x (``capture_outputs`` with
``tie_last_hidden_states=True``, checked on 5.17 Llama) the last entry of ``hidden_states`` is
overwritten by ``last_hidden_state``, i.e. the final norm is applied to it; the hook sees the last
layer's raw output, like every other layer's.

Rows are "points": every non-pad token (``tokens``, capped at ``max_points`` by a seeded sample
that is the same for every layer, so rows align across layers), the last non-pad token of each
prompt (``last``) or the mean over the non-pad tokens of each prompt (``mean``). Padding never
enters a point.

With a cache, a capture also keeps its progress beside the cache file (`<file>.partial.pt`,
every `CHECKPOINT_SECONDS`): at repair scale (200 k tokens on a 1.5B model) one capture is
longer than a job may run, and a rerun resumes after the saved batches with the same result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mka_exp.calibration import CalibrationSet
from mka_exp.layers import decoder_layers, num_layers, upper_layers

log = logging.getLogger(__name__)

REPRESENTATIONS = ("tokens", "last", "mean")
CACHE_FORMAT = 1


class _StopForward(Exception):
    """Raised by the last layer's hook: nothing after the decoder stack is needed."""


@contextlib.contextmanager
def layer_inputs(model: nn.Module, indices: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """`{i: hidden states entering decoder layer i}` of the forwards run in the block."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i in indices:

        def grab(_module: Any, args: tuple, kwargs: dict, i: int = i) -> None:
            seen[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(decoder_layers(model)[i].register_forward_pre_hook(grab, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def forward_from(model: nn.Module, start: int, hidden: torch.Tensor, **kwargs: Any) -> Any:
    """The model's output from the hidden states entering layer `start` (`kwargs`: position
    ids, attention mask, a KV cache of the layers from `start` up), equal to the full forward's."""
    with upper_layers(model, start):
        return model(inputs_embeds=hidden, **kwargs)


def check_representation(representation: str) -> None:
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"unknown representation {representation!r}; allowed: {', '.join(REPRESENTATIONS)}"
        )


def num_points(calib: CalibrationSet, representation: str, max_points: int) -> int:
    """How many rows `capture_hidden_states` returns, known before any forward pass."""
    check_representation(representation)
    if representation == "tokens":
        return min(int(calib.attention_mask.sum()), max_points)
    return len(calib)


def select_token_positions(
    attention_mask: torch.Tensor, max_points: int, seed: int
) -> torch.Tensor:
    """(prompt, position) of the sampled non-pad tokens, sorted; [n, 2] long."""
    positions = attention_mask.bool().nonzero()  # row-major, so already sorted
    if len(positions) <= max_points:
        return positions
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(positions), generator=generator)[:max_points]
    return positions[chosen.sort().values]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last non-pad token of each row (works for left or right padding)."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * (columns + 1)).argmax(dim=1)


def _reduce(hidden: torch.Tensor, mask: torch.Tensor, representation: str, picks) -> torch.Tensor:
    """The batch's points [m, D] from one layer's hidden states [b, T, D]."""
    mask = mask.to(hidden.device)
    if representation == "tokens":
        rows, cols = picks
        points = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    elif representation == "last":
        points = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]
    else:
        weights = mask.to(torch.float32).unsqueeze(-1)
        points = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return points.detach().to("cpu", torch.float32)


def _batch_picks(positions: torch.Tensor, start: int, size: int):
    """The sampled (row, col) pairs that fall in prompts [start, start+size), batch-local rows."""
    inside = (positions[:, 0] >= start) & (positions[:, 0] < start + size)
    return positions[inside, 0] - start, positions[inside, 1]


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _install_hooks(layers: nn.ModuleList, write) -> list:
    """Pre-hook on layer 0 (its input, slot 0) and a forward hook on every layer (its output,
    slot i + 1); `write(slot, hidden)` stores each."""
    last = len(layers) - 1

    def on_input(module, args, kwargs):
        write(0, _first_arg(args, kwargs))

    def on_output(index):
        def hook(module, args, output):
            write(index + 1, output[0] if isinstance(output, tuple) else output)
            if index == last:
                raise _StopForward

        return hook

    handles = [layers[0].register_forward_pre_hook(on_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(on_output(i)) for i, layer in enumerate(layers)]
    return handles


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop trailing columns that are padding in every row: the calibration set is padded to its
    longest prompt, a batch only needs its own longest (causal attention: exact)."""
    used = batch["attention_mask"].bool().any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return {name: tensor[:, :width] for name, tensor in batch.items()}


def _forward_to_last_layer(model: nn.Module, batch: dict, device: torch.device) -> None:
    with contextlib.suppress(_StopForward):
        model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)


def _run_capture(model, calib, representation, max_points, batch_size, seed, partial=None):
    """[L+1, n, D] float32, written in place: peak memory is the result plus one batch. With
    `partial` (a `_Progress`), resumes after the batches it holds and saves its progress."""
    layers = decoder_layers(model)
    positions = select_token_positions(calib.attention_mask, max_points, seed)
    shape = (len(layers) + 1, num_points(calib, representation, max_points))
    state: dict = {"start": 0}  # the batch being run, read by the hooks; "out" once allocated
    done = 0 if partial is None else partial.restore(state, shape)

    def write(slot: int, hidden: torch.Tensor) -> None:
        points = _reduce(hidden, state["mask"], representation, state["picks"])
        if "out" not in state:
            state["out"] = torch.empty(*shape, points.shape[1])
        state["out"][slot, state["start"] : state["start"] + len(points)] = points
        state["count"] = len(points)

    handles = _install_hooks(layers, write)
    device, first_prompt = _input_device(model), 0
    try:
        batches = map(_trim_padding, calib.batches(batch_size))
        total = -(-len(calib) // (batch_size or calib.batch_size))
        progress = tqdm(batches, total=total, desc="capture activations", leave=False)
        for index, batch in enumerate(progress):
            size = len(batch["input_ids"])
            if index >= done:
                state.update(
                    mask=batch["attention_mask"], picks=_batch_picks(positions, first_prompt, size)
                )
                _forward_to_last_layer(model, batch, device)
                state["start"] += state["count"]
                if partial is not None:
                    partial.keep(state, index + 1)
            first_prompt += size
    finally:
        for handle in handles:
            handle.remove()
    return state["out"]


# A capture on repair-scale calibration (200 k tokens) is hours on a CPU, longer than a job may
# run: with a cache it saves its progress this often, and a rerun resumes after the saved batches.
CHECKPOINT_SECONDS = 600.0


class _Progress:
    """A cached capture's progress on disk (`<cache file>.partial.pt`): the result so far, the
    batches done and the next row; checked like a cache entry (key, shape, CRC) before use."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path.with_name(f"{path.stem}.partial.pt"), key
        self.saved = time.monotonic()

    def restore(self, state: dict, shape: tuple) -> int:
        """Put the saved result into `state`; the batches it covers (0: none, start over)."""
        entry = _load_entry(self.path)
        problem = "unreadable" if entry is None else cache_problem(entry, self.key, (*shape, None))
        if problem is not None:
            if self.path.exists():
                log.warning("partial capture %s is damaged or stale (%s); starting over",
                            self.path, problem)  # fmt: skip
            return 0
        state.update(out=entry["tensor"], start=int(entry["start"]))
        log.info("capture resumes after %d batches (%s)", entry["batches"], self.path)
        return int(entry["batches"])

    def keep(self, state: dict, batches: int) -> None:
        if time.monotonic() - self.saved < CHECKPOINT_SECONDS:
            return
        out = state["out"]
        entry = {"format": CACHE_FORMAT, "key": self.key, "tensor": out, "crc32": tensor_crc(out)}
        save_atomic({**entry, "batches": batches, "start": state["start"]}, self.path)
        self.saved = time.monotonic()

    def finished(self) -> None:
        self.path.unlink(missing_ok=True)


def _load_entry(path: Path):
    try:
        return torch.load(path, weights_only=True) if path.exists() else None
    except Exception:  # a truncated or garbled file: started over (the caller says so)
        return None


def weight_fingerprint(model: nn.Module) -> str:
    """Cheap key of the current weights: the sum of every parameter tensor, in order.

    One read of the weights (no copies); any merge or edit of a tensor changes its sum.
    """
    sums = [float(p.detach().sum(dtype=torch.float32)) for p in model.parameters()]
    return hashlib.sha256(repr(sums).encode()).hexdigest()[:16]


def activation_key(model, calib: CalibrationSet, representation: str, max_points: int, seed: int):
    """Hash of everything the captured tensor depends on (used as a cache file name)."""
    config = model.config
    parts = {
        "name": getattr(config, "_name_or_path", ""),
        "config": config.to_json_string(use_diff=False),
        "weights": weight_fingerprint(model),
        "calib": calib.fingerprint(),
        "representation": representation,
        "max_points": max_points if representation == "tokens" else None,
        "seed": seed if representation == "tokens" else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def tensor_crc(tensor: torch.Tensor) -> int:
    """CRC32 of the tensor's bytes (about 1 GB/s: a small price next to recomputing it)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy())


def save_cache(tensor: torch.Tensor, path: Path, key: str) -> None:
    """A cached tensor with what it was made for: its key, shape and a CRC32 of its bytes."""
    entry = {"format": CACHE_FORMAT, "key": key, "shape": list(tensor.shape), "tensor": tensor}
    save_atomic({**entry, "crc32": tensor_crc(tensor)}, path)


def cache_problem(entry, key: str, shape: tuple) -> str | None:
    """What is wrong with a loaded cache entry (None: usable). `shape` may hold None (any)."""
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
        return "not a checked cache entry"
    tensor = entry.get("tensor")
    if not isinstance(tensor, torch.Tensor):
        return "no tensor"
    if entry.get("key") != key:
        return f"made for key {entry.get('key')!r}, not {key!r}"
    got = tuple(tensor.shape)
    fits = len(got) == len(shape) and all(w in (None, g) for w, g in zip(shape, got, strict=True))
    if not fits:
        return f"shape {list(got)}, expected {['*' if w is None else w for w in shape]}"
    if entry.get("crc32") != tensor_crc(tensor):
        return "checksum mismatch"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        return "non-finite values"
    return None


def load_cache(path: Path, key: str, shape: tuple) -> torch.Tensor | None:
    """The cached tensor if `path` holds a sound one made for `key` with this shape, else None.

    A damaged (truncated, garbled) or mismatched file is named in a warning and deleted, and the
    caller computes the tensor again."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, weights_only=True)
    except Exception as err:  # torch's own message advises unsafe loading: give the type only
        problem = f"unreadable ({type(err).__name__})"
    else:
        problem = cache_problem(entry, key, shape)
    if problem is None:
        return entry["tensor"]
    log.warning("cache %s is damaged or stale (%s); deleted, computing it again", path, problem)
    path.unlink(missing_ok=True)
    return None


def capture_hidden_states(
    model: nn.Module,
    calib: CalibrationSet,
    representation: str = "tokens",
    max_points: int = 2048,
    batch_size: int | None = None,
    cache: str | Path | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Hidden states [L+1, n, D] (float32, CPU) of every layer boundary on `calib`.

    With `cache` (a directory) the tensor is loaded if an identical capture was saved before,
    else computed and saved there.
    """
    check_representation(representation)
    if max_points < 1:
        raise ValueError(f"max_points={max_points} must be >= 1")
    path = key = partial = None
    if cache is not None:
        key = activation_key(model, calib, representation, max_points, seed)
        path = Path(cache).expanduser() / f"hidden_{key}.pt"
        shape = (num_layers(model) + 1, num_points(calib, representation, max_points), None)
        cached = load_cache(path, key, shape)
        if cached is not None:
            return cached
        partial = _Progress(path, key)
    with torch.inference_mode():
        states = _run_capture(model, calib, representation, max_points, batch_size, seed, partial)
    if path is not None:
        save_cache(states, path, key)
        partial.finished()
    return states


def token_cosine(states: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """Per-point cosine between boundary l and boundary l+gap: [L+1-gap, n].

    With `capture_hidden_states` rows, entry [l] compares the input of layer l with the output
    of layer l+gap-1 (ShortGPT: gap 1; angular distance: gap n). One layer at a time keeps the
    extra memory at one [n, D] pair.
    """
    if not 1 <= gap < len(states):
        raise ValueError(f"gap={gap} must be in [1, {len(states) - 1}]")
    rows = [
        F.cosine_similarity(states[i].double(), states[i + gap].double(), dim=-1)
        for i in range(len(states) - gap)
    ]
    return torch.stack(rows).clamp(-1.0, 1.0)
