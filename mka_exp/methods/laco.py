"""LaCo: Layer Collapse, merging runs of consecutive layers into the first of them.

Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse",
https://arxiv.org/abs/2402.11187. Reserving-Differences-while-Seeking-Common (RDSC) layer merge:
m consecutive layers l+1..l+m are merged into layer l by adding their differences to it,

    θ* = θ_l + Σ_{k=1..m} (θ_{l+k} − θ_l),

on the Linear weights (attention and MLP; the norms stay layer l's), and layers l+1..l+m are
removed. A merge is kept only if the merged model's final hidden states (after the final norm,
every calibration token) keep a mean cosine similarity of at least `threshold` with the dense
model's. The search is top-down: it starts with the last layers (l = L−1−m) and moves l down by
one after a rejected merge and by `min_interval` after an accepted one (so no layer is merged
again right away), until the target number of layers is gone. The last merge takes only as many
layers as are still missing, so any target count can be reached.
Each candidate runs the layers from its first one up over the calibration prompts (`num_prompts`
takes only the first n; the paper scores a few sentences): the layers below it are unchanged, so
it starts from their outputs, kept from one full pass per state of the model (memory: the inputs
to every layer, layers x calibration tokens x hidden size floats). A candidate is scored once per
state of the model.

The official code updates its copies in place, so its merge reduces to dropping layers (its
repository's issues #4 and #5); here the merged weights follow the formula (`tests/test_laco.py`).

When the threshold rejects too much. The paper stops with fewer layers removed than asked.
A curve point must have the layer count its ratio says, so with `fallback: true` (default) the
search continues past layer 0 by taking, among all merges of the current model, the one with the
highest similarity (after earlier merges it may reach the threshold; if not, with a warning);
the record counts those below it (`fallback_merges`) and marks each (`accepted: false`).
`fallback: false` stops the run instead.

On small models m=3 is too much. The merged layer is θ_{l+1} + θ_{l+2} + θ_{l+3} − 2θ_l, and
SmolLM2-135M's layers differ too much for that sum to stand for them: with 8 calibration prompts
its final states keep cosine 0.01-0.03 to the dense model's at l = 8, 14, 20 and 26 (dropping the
same three layers keeps 0.47-0.93), so nothing passes the paper's threshold. With m=1 the
similarity is 0.93-0.98, as high as dropping the layer (the evidence runs use m=1 there).

Not nested: the last, partial merge and the interval make a longer run's first merges differ
from a shorter run's, so a curve compresses a fresh copy of the dense model per point.

Example config (`conf/method/laco.yaml`)::

    _target_: mka_exp.methods.laco.LaCo
    ratio: 0.25
    m: 3              # layers merged into the first per step (the paper's C = 4 layers into 1)
    threshold: 0.65
    min_interval: 2
    fallback: true
    num_prompts: null  # similarity on the first n calibration prompts (null: all)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mka_exp.activations import forward_from, layer_inputs
from mka_exp.calibration import CalibrationSet
from mka_exp.layers import (
    decoder_layers,
    final_hidden_states,
    mergeable_tensors,
    num_layers,
    remove_layers,
    swapped_layers,
    trimmed_batch,
)
from mka_exp.methods.base import (
    LayerMethod,
    LayerTracker,
    check_amount,
    check_counts,
)

log = logging.getLogger(__name__)


def rdsc_merge(first: nn.Module, others: list[nn.Module]) -> nn.Module:
    """A copy of `first` with θ = θ_first + Σ (θ_other − θ_first) on its Linear weights."""
    merged = copy.deepcopy(first)
    mine = mergeable_tensors(merged, "linear")
    theirs = [mergeable_tensors(other, "linear") for other in others]
    with torch.no_grad():
        for name, tensor in mine.items():
            base = tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))
            total = base.clone()
            for other in theirs:
                total += other[name].to(device=base.device, dtype=base.dtype) - base
            tensor.copy_(total.to(tensor.dtype))
    return merged


def first_prompts(calib: CalibrationSet, n: int | None) -> CalibrationSet:
    """The first n calibration prompts (all with None): the similarity's cost is one forward
    pass over them per candidate merge."""
    if n is None or n >= len(calib):
        return calib
    return CalibrationSet(
        calib.name, calib.texts[:n], calib.input_ids[:n], calib.attention_mask[:n], calib.batch_size
    )


# per calibration batch: the batch and {i: the hidden states entering decoder layer i}
Batches = list[tuple[dict, dict[int, torch.Tensor]]]


def final_states(model, calib, batch_size: int | None) -> tuple[torch.Tensor, Batches]:
    """Final hidden states of every non-pad calibration token, [n, D] float32 (model's device),
    and what `final_states_from` restarts from: each batch's inputs to every decoder layer."""
    device = model.get_input_embeddings().weight.device
    rows, batches = [], []
    with torch.no_grad():
        for batch in calib.batches(batch_size):
            batch = trimmed_batch(batch, device)
            with layer_inputs(model, range(num_layers(model))) as seen:
                hidden = final_hidden_states(model, batch)
            rows.append(hidden[batch["attention_mask"].bool()].float())
            batches.append((batch, dict(seen)))
    return torch.cat(rows), batches


def final_states_from(model, batches: Batches, start: int) -> torch.Tensor:
    """`final_states` of a model whose layers below `start` are those of the pass that kept
    `batches`: only layers start..n-1 run, from the kept inputs to layer `start`."""
    rows = []
    with torch.no_grad():
        for batch, seen in batches:
            mask = batch["attention_mask"]
            out = forward_from(
                model.base_model, start, seen[start], attention_mask=mask, use_cache=False
            )
            rows.append(out.last_hidden_state[mask.bool()].float())
    return torch.cat(rows)


def mean_cosine(states: torch.Tensor, dense: torch.Tensor) -> float:
    """The mean over tokens of the cosine of each token's states to the dense model's."""
    return float(F.cosine_similarity(states.double(), dense.double(), dim=-1).mean())


class LaCo(LayerMethod):
    """Top-down RDSC merges accepted by final-state cosine similarity (see the module doc)."""

    nested = False  # see the module docstring

    def __init__(
        self,
        ratio: float | None = None,
        num_layers: int | None = None,
        m: int = 3,
        threshold: float = 0.65,
        min_interval: int = 2,
        fallback: bool = True,
        num_prompts: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        for name, value in (("m", m), ("min_interval", min_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"method.{name}={value!r} must be an integer >= 1")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"method.threshold={threshold!r} must be a number in [-1, 1]")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(
                f"method.threshold={threshold} is outside [-1, 1] (a cosine similarity)"
            )
        if not isinstance(fallback, bool):
            raise ValueError(f"method.fallback={fallback!r} must be true or false")
        if num_prompts is not None and (isinstance(num_prompts, bool) or num_prompts < 1):
            raise ValueError(f"method.num_prompts={num_prompts!r} must be null or an integer >= 1")
        check_amount(ratio, num_layers)
        self.ratio, self.num_layers = ratio, num_layers
        self.m, self.threshold, self.min_interval = m, float(threshold), min_interval
        self.fallback, self.num_prompts, self.batch_size = fallback, num_prompts, batch_size
        self._scores: dict[tuple[int, int], float] = {}  # (start, k) -> similarity, this model
        self._inputs: Batches | None = None  # this model's inputs to each layer (calibration)

    def options(self) -> dict:
        names = ("m", "threshold", "min_interval", "fallback", "num_prompts")
        return {name: getattr(self, name) for name in names}

    def check_m(self, total: int) -> None:
        if self.m >= total:
            raise ValueError(
                f"method.m={self.m} must be smaller than the model's {total} layers "
                f"(allowed 1..{total - 1})"
            )

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        total = num_layers(model)
        self.check_m(total)
        counts = check_counts(counts, total)
        calib = first_prompts(calib, self.num_prompts)
        dense, self._inputs = final_states(model, calib, self.batch_size)
        tracker, merges, tried = LayerTracker(total), [], []
        self._scores = {}
        start = total - 1 - self.m  # the top-down search position (current index)
        for count in counts:
            removed = sum(len(merge["merged"]) for merge in merges)
            while removed < count:
                k = min(self.m, count - removed)
                start = min(start, num_layers(model) - 1 - k)
                if start < 0:
                    merges.append(self.fallback_merge(model, calib, dense, tracker, k, removed))
                else:
                    similarity = self.similarity(model, calib, dense, start, k)
                    tried.append([tracker[start], k, similarity])
                    if similarity < self.threshold:
                        start -= 1
                        continue
                    merges.append(self.apply(model, tracker, start, k, similarity, True))
                    start -= self.min_interval
                removed += k
            yield count, self.stats(merges, tried)

    def similarity(self, model, calib, dense: torch.Tensor, start: int, k: int) -> float:
        """Mean token cosine of the final states with layers start..start+k merged vs dense
        (each candidate once per state of the model: the fallback reuses the search's scores).
        Layers below `start` are unchanged, so the pass starts at `start` from the inputs kept
        by one full pass of this state of the model."""
        if (start, k) in self._scores:
            return self._scores[start, k]
        if self._inputs is None:  # the model changed since its inputs were kept
            _, self._inputs = final_states(model, calib, self.batch_size)
        layers = decoder_layers(model)
        merged = rdsc_merge(layers[start], [layers[start + i] for i in range(1, k + 1)])
        swap = {start: merged, **dict.fromkeys(range(start + 1, start + k + 1))}
        with swapped_layers(model, swap):
            states = final_states_from(model, self._inputs, start)
        score = mean_cosine(states, dense)
        log.info("LaCo candidate: layers %d..%d, similarity %.4f", start, start + k, score)
        self._scores[start, k] = score
        return score

    def apply(self, model, tracker, start: int, k: int, similarity: float, accepted: bool) -> dict:
        layers = decoder_layers(model)
        layers[start] = rdsc_merge(layers[start], [layers[start + i] for i in range(1, k + 1)])
        remove_layers(model, list(range(start + 1, start + k + 1)))
        self._scores, self._inputs = {}, None  # the model changed
        keep, merged = tracker[start], [tracker.remove(start + 1) for _ in range(k)]
        log.info("LaCo merges layers %s into %d (similarity %.4f)", merged, keep, similarity)
        return {"keep": keep, "merged": merged, "similarity": similarity, "accepted": accepted}

    def fallback_merge(self, model, calib, dense, tracker, k: int, removed: int) -> dict:
        """The search reached layer 0 short of the target: the most similar merge of the current
        model (accepted if it reaches the threshold, else warned and recorded as a fallback), or
        stop with fallback: false."""
        if not self.fallback:
            raise RuntimeError(
                f"LaCo: method.threshold={self.threshold} accepted merges removing only {removed} "
                f"layers before reaching layer 0; lower the threshold or set method.fallback=true"
            )
        candidates = range(num_layers(model) - k)
        scores = [self.similarity(model, calib, dense, start, k) for start in candidates]
        best = max(candidates, key=lambda start: (scores[start], -start))
        accepted = scores[best] >= self.threshold  # the model changed since the search passed
        if not accepted:
            log.warning(
                "LaCo: no merge reaches threshold %.3f on the way to %d removed layers; merging "
                "layers %d..%d anyway (best similarity %.4f)",
                self.threshold, removed + k, tracker[best], tracker[best + k], scores[best],
            )  # fmt: skip
        return self.apply(model, tracker, best, k, scores[best], accepted)

    def stats(self, merges: list[dict], tried: list) -> dict:
        return {
            "removed_layers": sorted(layer for merge in merges for layer in merge["merged"]),
            "merges": [dict(merge) for merge in merges],
            "fallback_merges": sum(not merge["accepted"] for merge in merges),
            "candidates": [list(c) for c in tried],
            **self.options(),
        }
