"""SLEB: remove, one at a time, the block whose removal hurts the calibration perplexity least.

Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
Transformer Blocks", https://arxiv.org/abs/2402.09025. Scores from the dense model alone (like
ShortGPT's Block Influence) miss that removing one block changes how redundant the others are.
SLEB therefore scores every remaining block by the language-model perplexity of the model with
that block removed, on calibration text, removes the block with the lowest perplexity, and
rescores the remaining blocks on the model that lost it, until n blocks are gone. A candidate is
scored by standing an identity in for the block (no copy of the model). The layers below a
candidate are the same for every candidate, so a removal step runs them once: it walks the
candidates bottom-up, keeping the hidden states that enter the candidate (one layer's worth per
calibration batch), and scores candidate p by running only the layers above it. That halves the
decoder work of the naive pass per candidate and gives the same perplexities
(`benchmarks/sleb_search.py` measures both).

Greedy, so nested: the first k removals of a run that removes n > k are the k-block result, and
`progressive` walks a whole curve in one process. With `cache` (a directory) each step's candidate
perplexities are kept under a key of the model as it stands at that step and the calibration set,
so a second run on the same model and data (another repair, another quantizer) replays the search
from the cache instead of repeating it.

`search_tokens` (null: the whole calibration set) scores the candidates on evenly spaced prompts
of the calibration set holding at least that many tokens: a set sized for a repair's fit (200 k
tokens of `calib=hellaswag_passages`) would make each removal step take days on a CPU. The record
says which prompts and tokens the search read (`search_prompts`, `search_tokens`).

Example config (`conf/method/sleb.yaml`)::

    _target_: mka_exp.methods.sleb.SLEB
    ratio: 0.25
    batch_size: null   # calibration batch size
    search_tokens: null   # at least this many tokens of evenly spaced prompts; null: all
    cache: ${paths.cache_dir}   # each step's candidate perplexities; null: off
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mka_exp.activations import activation_key, load_cache, save_cache
from mka_exp.calibration import CalibrationSet
from mka_exp.checks import is_int
from mka_exp.layers import (
    SkippedLayer,
    decoder_layers,
    final_hidden_states,
    hooks_removed_after,
    num_layers,
    remove_layers,
    swapped_layers,
    trimmed_batch,
    with_hidden_input,
)
from mka_exp.methods.base import LayerMethod, LayerTracker, check_amount, check_counts

log = logging.getLogger(__name__)

LOGIT_CHUNK = 2048  # tokens per LM-head call: full [batch, T, vocab] logits would dominate memory


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (what follows is not needed)."""


def _feeding(module: nn.Module, inputs: list[torch.Tensor] | None) -> list:
    """Hand `module` inputs[0], inputs[1], ... (one per calibration batch, in order) as its hidden
    states; no hook when `inputs` is None (the module reads what the model computes)."""
    if inputs is None:
        return []
    queue = iter(inputs)
    hook = lambda module, args, kwargs: with_hidden_input(args, kwargs, next(queue))  # noqa: E731
    return [module.register_forward_pre_hook(hook, with_kwargs=True)]


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
            batch = trimmed_batch(batch, device)
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


def layer_outputs(model, calib, position: int, inputs, batch_size) -> list[torch.Tensor]:
    """The hidden states leaving layer `position`, per calibration batch, from running that layer
    alone on `inputs` (what enters it; None for layer 0, which reads the embeddings)."""
    layer, outputs = decoder_layers(model)[position], []
    device = model.get_input_embeddings().weight.device

    def keep(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())
        raise _Stop

    handles = [*_feeding(layer, inputs), layer.register_forward_hook(keep)]
    below = dict.fromkeys(range(position))  # stand aside: the fed input replaces their output
    with hooks_removed_after(handles), swapped_layers(model, below), torch.no_grad():
        for batch in calib.batches(batch_size):
            with contextlib.suppress(_Stop):
                final_hidden_states(model, trimmed_batch(batch, device))
    return outputs


def perplexity_without(model, calib, position: int, inputs, batch_size) -> float:
    """Calibration perplexity with layer `position` removed, running only the layers above it:
    those below stand aside and the stand-in for `position` hands on `inputs` (what entered it)."""
    stand_in = SkippedLayer(decoder_layers(model)[position])
    skipped = {**dict.fromkeys(range(position)), position: stand_in}
    with hooks_removed_after(_feeding(stand_in, inputs)), swapped_layers(model, skipped):
        return math.exp(calibration_nll(model, calib, batch_size))


def removal_perplexities(model, calib, batch_size=None) -> list[float]:
    """Calibration perplexity of the model without each of its layers, one after another, bottom
    up: the input of candidate p + 1 is candidate p's input run through layer p (one layer)."""
    total, inputs, scores = num_layers(model), None, []
    for position in range(total):
        scores.append(perplexity_without(model, calib, position, inputs, batch_size))
        if position + 1 < total:
            inputs = layer_outputs(model, calib, position, inputs, batch_size)
    return scores


def search_subset(calib: CalibrationSet, tokens: int | None) -> CalibrationSet:
    """The prompts the search scores on: all (null, or a set no larger than `tokens`), or the
    fewest evenly spaced prompts holding at least `tokens` tokens (evenly spaced: a set ordered by
    length keeps its spread of lengths)."""
    lengths = calib.attention_mask.sum(dim=1)
    if tokens is None or int(lengths.sum()) <= tokens:
        return calib
    n = len(calib)
    for m in range(1, n + 1):
        picks = torch.linspace(0, n - 1, m).round().long().unique()
        if int(lengths[picks].sum()) >= tokens:
            break
    rows = picks.tolist()
    return CalibrationSet(
        f"{calib.name}[sleb search: {len(rows)} prompts]",
        [calib.texts[i] for i in rows],
        calib.input_ids[picks],
        calib.attention_mask[picks],
        calib.batch_size,
    )


def search_stats(calib: CalibrationSet, tokens: int | None) -> dict:
    """What the record says of the search set (nothing without `search_tokens`: as before)."""
    if tokens is None:
        return {}
    return {"search_prompts": len(calib), "search_tokens": int(calib.attention_mask.sum())}


class SLEB(LayerMethod):
    """Greedy block removal by calibration perplexity, rescored after every removal."""

    nested = True  # greedy: the n-block removal extends the (n-1)-block one

    def __init__(
        self,
        ratio: float | None = None,
        num_layers: int | None = None,
        batch_size=None,
        cache: str | None = None,
        search_tokens: int | None = None,
    ) -> None:
        check_amount(ratio, num_layers)
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"method.batch_size={batch_size!r} must be null or an integer >= 1")
        if search_tokens is not None and not (is_int(search_tokens) and search_tokens >= 1):
            raise ValueError(
                f"method.search_tokens={search_tokens!r}: allowed null (the whole calibration set) "
                "or an integer >= 1"
            )
        self.ratio, self.num_layers, self.batch_size = ratio, num_layers, batch_size
        self.cache, self.search_tokens = cache, search_tokens

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        """Remove the cheapest block, rescore, repeat; yield after each count is reached."""
        total = num_layers(model)
        counts = check_counts(counts, total)
        calib = search_subset(calib, self.search_tokens)
        dense = math.exp(calibration_nll(model, calib, self.batch_size))
        tracker, steps = LayerTracker(total), []
        for count in counts:
            while len(steps) < count:
                steps.append(self.removal_step(model, calib, tracker))
            yield count, {**self.stats(dense, steps), **search_stats(calib, self.search_tokens)}

    def removal_step(self, model, calib, tracker: LayerTracker) -> dict:
        """Score every remaining block by the perplexity without it; remove the lowest."""
        scores, cached = self.scores(model, calib)
        best = min(range(len(scores)), key=lambda p: (scores[p], p))
        candidates = [[tracker[p], score] for p, score in enumerate(scores)]
        layer = tracker.remove(best)
        remove_layers(model, [best])
        log.info("SLEB removes layer %d (calibration perplexity %.3f)", layer, scores[best])
        return {
            "layer": layer,
            "perplexity": scores[best],
            "candidates": candidates,
            "from_cache": cached,  # the record's method seconds then exclude this step's scoring
        }

    def scores(self, model, calib) -> tuple[list[float], bool]:
        """`removal_perplexities` of the model as it stands, and whether they came from the cache."""
        path = self._cache_path(model, calib)
        cached = None if path is None else load_cache(path, path.stem, (num_layers(model),))
        if cached is not None:
            log.info("SLEB: candidate perplexities of %d layers from %s", len(cached), path)
            return cached.tolist(), True
        scores = removal_perplexities(model, calib, self.batch_size)
        if path is not None:
            save_cache(torch.tensor(scores, dtype=torch.float64), path, path.stem)
        return scores, False

    def _cache_path(self, model, calib) -> Path | None:
        if self.cache is None:
            return None
        key = activation_key(model, calib, "sleb_perplexity", 0, 0)
        batch = self.batch_size or calib.batch_size  # batch shapes round the sums differently
        return Path(self.cache).expanduser() / f"sleb_{key}_b{batch}.pt"

    def seed_cache(self, model, calib, steps: list[dict]) -> list[Path]:
        """Write the cache entries that a finished search's `steps` (a record's
        `method_stats["steps"]`) stand for, removing each step's layer from `model` as the search
        did. A later run on the same model and calibration set then replays those steps. Records
        travel (in git, to another machine) where the cache does not; this rebuilds it from them."""
        if self.cache is None:
            raise ValueError("method.cache=null: seeding needs a cache directory")
        calib = search_subset(calib, self.search_tokens)
        tracker, paths = LayerTracker(num_layers(model)), []
        for number, step in enumerate(steps, 1):
            layers = [int(layer) for layer, _ in step["candidates"]]
            if layers != tracker.original:
                raise ValueError(
                    f"step {number} scores layers {layers}, but the model as the search left it "
                    f"has {tracker.original}: the record is of another model or search"
                )
            path = self._cache_path(model, calib)
            scores = torch.tensor([score for _, score in step["candidates"]], dtype=torch.float64)
            save_cache(scores, path, path.stem)
            paths.append(path)
            position = tracker.original.index(int(step["layer"]))
            tracker.remove(position)
            remove_layers(model, [position])
        return paths

    @staticmethod
    def stats(dense: float, steps: list[dict]) -> dict:
        return {
            "removed_layers": sorted(step["layer"] for step in steps),
            "removal_order": [step["layer"] for step in steps],
            "dense_perplexity": dense,
            "steps": [dict(step) for step in steps],
        }
