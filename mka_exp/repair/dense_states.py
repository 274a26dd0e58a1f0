"""The dense model's hidden states at layer boundaries, per calibration batch, for the linear
repair's fits; kept on disk across runs when `repair.reuse` names a store directory.

Why: each fit needs the dense model's state entering its first changed layer (the compressed
pass starts there) and at the end of its span (the target), so each fit runs the dense model over
every calibration token up to that end. At ReplaceMe's scale (200 k tokens) that pass is hours on
a CPU for a 1.5B model, and a declared grid fits several repaired runs (two methods, two cuts) on
the same tokens. With a store, a pass keeps the states at every `reuse_layers`-th boundary (and at
the boundaries it was asked for); a later fit reads its two states when they are there, or runs
the dense model from the highest stored boundary below its cursor instead of from the embedding.

Boundary b is the state entering decoder layer b (the output of layer b - 1; boundary n is the
last layer's output, before the final norm). An entry's key is the dense model's fingerprint
below b (`fingerprints`) and the digest of the whole trimmed batch (its tokens and mask: padding
and batch composition change the states), so a different model or batch never finds it; a
missing or damaged entry is recomputed (`state_store`). Same numbers with or without a store:
the layers from b up get the state the full pass would hand them (tests/test_repair_dense_states.py).

    states = DenseStates(dense_model, Store(root, 16 * 2**30), every=4)
    fed, target = states.boundaries(batch, cursor=21, end=28)

May import: torch, `layers`, `fingerprints`, `state_store`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from mka_exp.fingerprints import fingerprints
from mka_exp.layers import (
    decoder_layers,
    hooks_removed_after,
    num_layers,
    swapped_layers,
    with_hidden_input,
)
from mka_exp.state_store import Key, Store


class _StopForward(Exception):
    """Raised once the pass has reached the last boundary it needs."""


def batch_digest(batch: dict) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(batch):
        tensor = batch[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def kept_boundaries(spec: int | Sequence[int], n: int) -> set[int]:
    """Boundaries a pass stores: every `spec`-th (an int) or the listed ones, in 1..n."""
    wanted = range(spec, n + 1, spec) if isinstance(spec, int) else spec
    return {int(b) for b in wanted if 0 < int(b) <= n}


class DenseStates:
    """Boundary states of one dense model (never changed), from a store or a pass."""

    def __init__(self, model: nn.Module, store: Store | None = None, every=4) -> None:
        self.model, self.store = model, store
        n = num_layers(model)
        self.keep = kept_boundaries(every, n) if store is not None else set()
        self.prints = fingerprints(model, n) if store is not None else []
        self.layer_tokens = 0  # layers x tokens the dense model ran (stats)
        self.read = 0  # entries read from the store

    def boundaries(self, batch: dict, cursor: int, end: int) -> tuple:
        """(state at boundary `cursor` or None for 0, state at boundary `end`), [b, T, D] each."""
        digest = batch_digest(batch) if self.store is not None else ""
        wanted = [cursor, end] if cursor > 0 else [end]
        found = {b: self.get(b, digest) for b in wanted}
        if all(state is not None for state in found.values()):
            self.read += len(found)
            return found.get(cursor), found[end]
        starts = (b for b in {*self.keep, cursor} if 0 < b <= cursor and self.has(b, digest))
        start = max(starts, default=0)
        # the cursor's state, when stored, was read above: never read an entry twice
        fed = found.get(start) if start == cursor else self.get(start, digest) if start else None
        if start > 0 and fed is None:  # gone since `has`: the whole pass
            start = 0
        # With the target stored, the pass need only reach the cursor.
        stop = cursor if found[end] is not None else end
        seen = self.run(batch, start, fed, stop, {*self.keep, *wanted})
        for b, state in seen.items():
            self.put(b, digest, state)
        self.read += found[end] is not None
        target = found[end] if found[end] is not None else seen[end]
        return seen.get(cursor) if cursor > 0 else None, target

    def run(self, batch: dict, start: int, fed, end: int, capture: set[int]) -> dict:
        """`{b: state}` for the boundaries in `capture` within (start, end] (and `start` if
        fed), running layers start..end-1 with layer `start` fed `fed`."""
        layers, seen = decoder_layers(self.model), {}
        if fed is not None:
            seen[start] = fed
        handles = []
        for b in sorted(b for b in capture if start < b < end):
            grab = lambda module, args, kwargs, b=b: seen.__setitem__(b, _input(args, kwargs))  # noqa: E731
            handles.append(layers[b].register_forward_pre_hook(grab, with_kwargs=True))

        def last(module, args, output):
            seen[end] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handles.append(layers[end - 1].register_forward_hook(last))
        if start > 0:
            feed = lambda module, args, kwargs: with_hidden_input(args, kwargs, fed)  # noqa: E731
            handles.append(layers[start].register_forward_pre_hook(feed, with_kwargs=True))
        device = self.model.get_input_embeddings().weight.device
        # The layers below `start` stand aside: layer `start` gets the stored state.
        skipped = swapped_layers(self.model, dict.fromkeys(range(start)))
        with hooks_removed_after(handles), skipped, contextlib.suppress(_StopForward):
            self.model(**{k: t.to(device) for k, t in batch.items()}, use_cache=False)
        self.layer_tokens += (end - start) * int(batch["attention_mask"].numel())
        return seen

    def key(self, b: int, digest: str) -> Key:
        return Key(self.prints[b], digest, b)

    def has(self, b: int, digest: str) -> bool:
        return self.store is not None and self.store.has(self.key(b, digest))

    def get(self, b: int, digest: str):
        return None if self.store is None else self.store.get(self.key(b, digest))

    def put(self, b: int, digest: str, state: torch.Tensor) -> None:
        if self.store is not None:
            self.store.put(self.key(b, digest), state.detach().cpu())

    def stats(self) -> dict:
        return {"dense_layer_tokens": self.layer_tokens, "dense_entries_read": self.read}


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return (args[0] if args else kwargs["hidden_states"]).detach()
