"""Angular distance: remove the block of n consecutive layers that changes its input the least.

Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
https://arxiv.org/abs/2403.17887. For a block of n layers starting at l, the angular distance
d(l, n) = arccos(cos(x_l, x_{l+n})) / pi between the hidden state entering layer l and the one
leaving layer l+n-1, averaged over the calibration points. The block [l*, l*+n) with
l* = argmin_l d(l, n) is removed (the paper then heals with QLoRA; we do not).

The paper measures at the final token of each sequence, hence the default `representation: last`
(`tokens` averages over every non-pad token instead).

Not nested: the best block of n+1 layers need not contain the best block of n. `progressive`
computes every requested block from ONE capture of the dense model; if the blocks happen to be
nested it walks them in place, otherwise it raises NotImplementedError before touching the model
(reload the model per point instead).

Example config (`conf/method/angular.yaml`)::

    _target_: mka_exp.methods.angular.Angular
    ratio: 0.25
    representation: last
    max_points: 4096
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise

import torch

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


def angular_distances(states: torch.Tensor, n: int) -> list[float]:
    """d(l, n) for every start l in [0, L-n], from [L+1, points, D] states."""
    return (torch.arccos(token_cosine(states, gap=n)) / math.pi).mean(dim=1).tolist()


def best_block(distances: list[float]) -> int:
    """Start of the block with the smallest distance (ties: the earliest)."""
    return min(range(len(distances)), key=lambda start: (distances[start], start))


def blocks_are_nested(blocks: list[range]) -> bool:
    return all(set(a) <= set(b) for a, b in pairwise(blocks))


class Angular(LayerMethod):
    """Remove the n consecutive layers with the smallest input-to-output angular distance."""

    nested = False  # see the module docstring

    def __init__(
        self,
        ratio: float | None = None,
        num_layers: int | None = None,
        representation: str = "last",
        max_points: int = 4096,
        batch_size: int | None = None,
        cache: str | None = None,
        seed: int = 0,
    ) -> None:
        set_capture(self, representation, max_points, batch_size, cache, seed)
        check_amount(ratio, num_layers)
        self.ratio, self.num_layers = ratio, num_layers

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        """Walk the blocks of every count in place; only possible when they are nested."""
        total = num_layers(model)
        counts = check_counts(counts, total)
        states = capture_for(self, model, calib)
        plans = [self._plan(states, count) for count in counts]
        del states
        blocks = [
            range(p["block_start"], p["block_start"] + c)
            for p, c in zip(plans, counts, strict=True)
        ]
        if not blocks_are_nested(blocks):
            raise NotImplementedError(
                f"angular blocks for counts {counts} are not nested ({[list(b) for b in blocks]});"
                " compress a freshly loaded model for each count instead"
            )
        tracker, removed = LayerTracker(total), []
        for count, block, plan in zip(counts, blocks, plans, strict=True):
            remove_by_original_index(model, tracker, [i for i in block if i not in removed])
            removed = list(block)
            yield count, {"removed_layers": removed, **plan}

    @staticmethod
    def _plan(states: torch.Tensor, count: int) -> dict:
        if count == 0:
            return {"angular_distance": [], "block_start": 0}
        distances = angular_distances(states, count)
        return {"angular_distance": distances, "block_start": best_block(distances)}
