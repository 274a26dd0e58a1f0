"""Reuse across models (issue 29): a variant whose bottom k decoder layers are the reference's
starts from the reference's hidden states entering layer k, and runs only layers k..n-1.

Why: a comparison grid evaluates many compressed variants of one base model on the same
examples, and most of them leave the bottom of the model untouched (reverse pruning and MKA
change the top layers; a linear repair one `down_proj`). The prefix cache runs every shared token
prefix once per model; this runs every (token, layer) pair that is the same in two models once.

Exactness: an entry's key is the `fingerprints` of everything that produced it (the embedding,
rotary and other stack buffers, every parameter and buffer of layers 0..k-1 with their names and
module types, the config as it bears on those layers, dtype and device kind) together with the
digest of its token path, so a different model never finds it. The upper layers run through the
model's own forward (`layers.upper_layers`): its masks, sliding windows, rotary embeddings, q/k
norms and biases, on a KV cache of its upper layers only.

    prints = fingerprints(model, upto=24)          # prints[k]: layers below k
    logits = forward_from(model, k, hidden_k, position_ids=..., attention_mask=...).logits  # activations

`Reuse` ties the fingerprints, the stored layers and a `state_store.Store` to the prefix cache's
tree (`prefix_cache.Run`). May import: torch, `activations`, `layers`, `evaluation.prefix_tree`,
`state_store`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mka_exp.activations import layer_inputs
from mka_exp.evaluation.prefix_tree import Node
from mka_exp.fingerprints import fingerprints
from mka_exp.layers import decoder_layers, upper_layers
from mka_exp.state_store import Key, Store

log = logging.getLogger(__name__)


class ReuseMiss(RuntimeError):
    """An entry the run counted on is missing or damaged: the call is recomputed without it."""


def path_digests(root: Node) -> dict[int, str]:
    """`id(node) -> digest` of the token path from the root to the node and its split points
    (the node's entry holds its own positions, so where the path is cut matters)."""
    digests = {id(root): ""}
    for node in root.subtree():  # parents before children
        if node is root:
            continue
        parent = digests[id(node.parent)]
        text = f"{parent}|{len(node.tokens)}|{','.join(map(str, node.tokens))}|{node.tail}"
        digests[id(node)] = hashlib.blake2b(text.encode(), digest_size=20).hexdigest()
    return digests


# --------------------------------------------------------------------------- exactness core


# --------------------------------------------------------------------------- the prefix tree


def stored_layers(spec: int | Sequence[int], n: int) -> list[int]:
    """Layers whose inputs are kept: every `spec`-th (an int), or the listed ones, in 1..n-1."""
    wanted = range(spec, n, spec) if isinstance(spec, int) else spec
    return sorted({int(i) for i in wanted if 0 < int(i) < n})


class Reuse:
    """One model's side of the cache: its fingerprints, the layers it stores and the store."""

    def __init__(self, model: nn.Module, store: Store, layers: int | Sequence[int]) -> None:
        self.model, self.store = model, store
        self.layers = stored_layers(layers, len(decoder_layers(model)))
        self.prints = fingerprints(model, max(self.layers, default=0))
        self.digests: dict[int, str] = {}
        self.read = 0

    def key(self, k: int, node: Node) -> Key:
        return Key(self.prints[k], self.digests[id(node)], k)

    def start(self, root: Node, longest: int) -> int:
        """The deepest stored layer with an entry for every node that runs (`end <= longest`;
        longer ones fall back to HFLM), 0 when none has."""
        self.index(root)
        nodes = [n for n in root.subtree() if n is not root and n.end <= longest]
        for k in reversed(self.layers):
            if nodes and all(self.store.has(self.key(k, node)) for node in nodes):
                return k
        return 0

    def index(self, root: Node) -> None:
        """Key the nodes of this tree (and forget the last tree's: ids are reused)."""
        self.digests = path_digests(root)

    def hidden(self, k: int, batch: list[Node], width: int) -> torch.Tensor:
        """The batch's inputs to layer k, right-padded with zeros (after every real token)."""
        rows = []
        for node in batch:
            entry = self.store.get(self.key(k, node))
            if entry is None or entry.shape[0] != len(node.tokens):
                raise ReuseMiss(f"no usable entry for layer {k} of a {len(node.tokens)}-token node")
            rows.append(entry)
            self.read += 1
        out = rows[0].new_zeros((len(batch), width, rows[0].shape[-1]))
        for r, entry in enumerate(rows):
            out[r, : entry.shape[0]] = entry
        return out.to(next(self.model.parameters()).device)

    def save(self, seen: dict[int, torch.Tensor], batch: list[Node]) -> None:
        for k, hidden in seen.items():
            for r, node in enumerate(batch):
                self.store.put(self.key(k, node), hidden[r, : len(node.tokens)].clone())

    @contextlib.contextmanager
    def inputs(self, start: int, batch: list[Node], ids: torch.Tensor) -> Iterator[dict]:
        """The forward's token inputs (from layer `start`: the cached hidden states, the model
        cut to its upper layers); the inputs of the stored layers above are kept afterwards."""
        above = [k for k in self.layers if k > start]
        with layer_inputs(self.model, above) as seen:
            if start:
                hidden = self.hidden(start, batch, ids.shape[1])
                with upper_layers(self.model, start):
                    yield {"inputs_embeds": hidden}
            else:
                yield {"input_ids": ids}
        self.save(seen, batch)
