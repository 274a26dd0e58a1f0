"""Reverse-order pruning: drop the last decoder layers.

The simplest layer-pruning baseline of the MKA paper (https://arxiv.org/abs/2406.16330, Tables
3-4); the paper's public MKA code in effect computes this, because its merge changes no weights.
ShortGPT (https://arxiv.org/abs/2403.03853) keeps the final layer and drops the n before it: that
is `keep_final=true`. The default is `false` (the last n layers), the MKA paper's baseline.

Example config (`conf/method/reverse_prune.yaml`)::

    _target_: mka_exp.methods.reverse_prune.ReversePrune
    ratio: 0.25
    keep_final: false
"""

from __future__ import annotations

from collections.abc import Iterator

from mka_exp.layers import num_layers, remove_layers
from mka_exp.methods.base import (
    LayerMethod,
    check_amount,
    check_counts,
)


class ReversePrune(LayerMethod):
    nested = True  # the last n+1 layers contain the last n

    def __init__(
        self, ratio: float | None = None, num_layers: int | None = None, keep_final: bool = False
    ) -> None:
        check_amount(ratio, num_layers)
        self.ratio, self.num_layers, self.keep_final = ratio, num_layers, keep_final

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        """Cut from the back (before the final layer with keep_final), one count at a time."""
        total = num_layers(model)
        counts = check_counts(counts, total)
        end = total - 1 if self.keep_final else total
        removed = 0
        for count in counts:
            # Positions before `end` are unchanged by earlier cuts, which all lie at or after it.
            remove_layers(model, list(range(end - count, end - removed)))
            removed = count
            yield count, {"removed_layers": list(range(end - count, end))}
