"""SLEB: remove, one at a time, the block whose removal hurts the calibration perplexity least.

Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
Transformer Blocks", https://arxiv.org/abs/2402.09025. Scores from the dense model alone (like
ShortGPT's Block Influence) miss that removing one block changes how redundant the others are.
SLEB therefore scores every remaining block by the language-model perplexity of the model with
that block removed, on calibration text, removes the block with the lowest perplexity, and
rescores the remaining blocks on the model that lost it, until n blocks are gone. A candidate is
scored by standing an identity in for the block (no copy of the model): one forward pass over
the calibration set per candidate, L + (L-1) + ... + (L-n+1) passes for n removals.

Greedy, so nested: the first k removals of a run that removes n > k are the k-block result, and
`progressive` walks a whole curve in one process.

Example config (`conf/method/sleb.yaml`)::

    _target_: mka_exp.methods.sleb.SLEB
    ratio: 0.25
    batch_size: null   # calibration batch size
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mka_exp.layers import decoder_layers, num_layers, remove_layers
from mka_exp.methods.base import LayerMethod, LayerTracker, check_amount, check_counts

log = logging.getLogger(__name__)

LOGIT_CHUNK = 2048  # tokens per LM-head call: full [batch, T, vocab] logits would dominate memory


class _Skipped(nn.Module):
    """Stands in for a decoder layer: hands its input on unchanged."""

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
            layers[position] = module if module is not None else _Skipped(saved[position])
        yield
    finally:
        for position, module in saved.items():
            layers[position] = module


def _trimmed(batch: dict, device) -> dict:
    used = batch["attention_mask"].bool().any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return {name: tensor[:, :width].to(device) for name, tensor in batch.items()}


def final_hidden_states(model, batch: dict) -> torch.Tensor:
    """The decoder stack's output after the final norm, [b, T, D] (what the LM head reads)."""
    out = model.base_model(**batch, use_cache=False)
    return out.last_hidden_state


def calibration_nll(model, calib, batch_size: int | None = None) -> float:
    """Mean next-token negative log-likelihood over the calibration set's non-pad tokens."""
    device = model.get_input_embeddings().weight.device
    head, cap = (
        model.get_output_embeddings(),
        getattr(model.config, "final_logit_softcapping", None),
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in calib.batches(batch_size):
            batch = _trimmed(batch, device)
            hidden = final_hidden_states(model, batch)
            mask = batch["attention_mask"].bool()
            valid = mask[:, 1:] & mask[:, :-1]
            states, targets = hidden[:, :-1][valid], batch["input_ids"][:, 1:][valid]
            for start in range(0, len(states), LOGIT_CHUNK):
                logits = head(states[start : start + LOGIT_CHUNK]).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                chunk = targets[start : start + LOGIT_CHUNK]
                total += float(F.cross_entropy(logits, chunk, reduction="sum"))
            count += len(states)
    if count == 0:
        raise ValueError("the calibration set has no token with a next token to predict")
    return total / count


class SLEB(LayerMethod):
    """Greedy block removal by calibration perplexity, rescored after every removal."""

    nested = True  # greedy: the n-block removal extends the (n-1)-block one

    def __init__(
        self, ratio: float | None = None, num_layers: int | None = None, batch_size=None
    ) -> None:
        check_amount(ratio, num_layers)
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"method.batch_size={batch_size!r} must be null or an integer >= 1")
        self.ratio, self.num_layers, self.batch_size = ratio, num_layers, batch_size

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        """Remove the cheapest block, rescore, repeat; yield after each count is reached."""
        total = num_layers(model)
        counts = check_counts(counts, total)
        dense = math.exp(calibration_nll(model, calib, self.batch_size))
        tracker, steps = LayerTracker(total), []
        for count in counts:
            while len(steps) < count:
                steps.append(self.removal_step(model, calib, tracker))
            yield count, self.stats(dense, steps)

    def removal_step(self, model, calib, tracker: LayerTracker) -> dict:
        """Score every remaining block by the perplexity without it; remove the lowest."""
        scores = []
        for position in range(num_layers(model)):
            with swapped_layers(model, {position: None}):
                scores.append(math.exp(calibration_nll(model, calib, self.batch_size)))
        best = min(range(len(scores)), key=lambda p: (scores[p], p))
        candidates = [[tracker[p], score] for p, score in enumerate(scores)]
        layer = tracker.remove(best)
        remove_layers(model, [best])
        log.info("SLEB removes layer %d (calibration perplexity %.3f)", layer, scores[best])
        return {"layer": layer, "perplexity": scores[best], "candidates": candidates}

    @staticmethod
    def stats(dense: float, steps: list[dict]) -> dict:
        return {
            "removed_layers": sorted(step["layer"] for step in steps),
            "removal_order": [step["layer"] for step in steps],
            "dense_perplexity": dense,
            "steps": [dict(step) for step in steps],
        }
