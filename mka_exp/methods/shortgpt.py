"""ShortGPT: remove the layers that change their input the least.

Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
https://arxiv.org/abs/2403.03853. The Block Influence of layer i is
BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), where x_i is the hidden state entering layer i
and x_{i+1} the one leaving it. A layer whose output points the same way as its input adds little
to the residual stream; the n layers with the lowest BI are removed. BI is computed once, on the
dense model (as in the paper), from one capture pass over the calibration prompts, so the cuts are
nested: the n+1-layer cut extends the n-layer cut, and `progressive` walks a whole curve.

Example config (`conf/method/shortgpt.yaml`)::

    _target_: mka_exp.methods.shortgpt.ShortGPT
    ratio: 0.25
    representation: tokens
    max_points: 4096
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mka_exp.activations import token_cosine
from mka_exp.layers import num_layers
from mka_exp.methods.base import (
    LayerMethod,
    LayerTracker,
    capture_for,
    check_amount,
    check_counts,
    remove_by_original_index,
    set_capture,
)


def block_influence(states) -> list[float]:
    """BI_i = 1 - mean_tokens cos(x_i, x_{i+1}) for every layer i, from [L+1, n, D] states."""
    return (1.0 - token_cosine(states, gap=1).mean(dim=1)).tolist()


def removal_order(scores: Sequence[float]) -> list[int]:
    """Layer indices from least to most important (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


class ShortGPT(LayerMethod):
    """Remove the n layers with the lowest Block Influence (computed once)."""

    nested = True  # the order is fixed by BI of the dense model

    def __init__(
        self,
        ratio: float | None = None,
        num_layers: int | None = None,
        representation: str = "tokens",
        max_points: int = 4096,
        batch_size: int | None = None,
        cache: str | None = None,
        seed: int = 0,
    ) -> None:
        set_capture(self, representation, max_points, batch_size, cache, seed)
        check_amount(ratio, num_layers)
        self.ratio, self.num_layers = ratio, num_layers

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        """Remove layers in BI order, yielding after each count is reached."""
        total = num_layers(model)
        counts = check_counts(counts, total)
        states = capture_for(self, model, calib)
        scores = block_influence(states)
        del states
        order, tracker, removed = removal_order(scores), LayerTracker(total), []
        for count in counts:
            new = order[len(removed) : count]
            remove_by_original_index(model, tracker, new)
            removed += new
            yield count, {"removed_layers": sorted(removed), "block_influence": scores}
