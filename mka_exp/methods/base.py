"""What every layer method shares: how many layers to take out, and the original-index bookkeeping."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise
from typing import Any

from mka_exp.activations import capture_hidden_states, check_representation
from mka_exp.checks import is_int, is_number
from mka_exp.layers import num_layers as count_layers
from mka_exp.layers import remove_layers


def check_amount(ratio: float | None, num_layers: int | None) -> None:
    """The checks that need no model: run at construction so bad input fails before loading."""
    if ratio is not None and not is_number(ratio):
        raise ValueError(f"method.ratio={ratio!r} is not a number; allowed a float in (0, 1)")
    if num_layers is not None and not is_int(num_layers):
        raise ValueError(f"method.num_layers={num_layers!r}: allowed an integer >= 1")
    if (ratio is None) == (num_layers is None):
        raise ValueError(
            f"give exactly one of method.ratio or method.num_layers (got ratio={ratio}, "
            f"num_layers={num_layers})"
        )
    if ratio is not None and not 0 < ratio < 1:
        raise ValueError(f"method.ratio={ratio} is outside the allowed range (0, 1)")
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"method.num_layers={num_layers} must be >= 1")


def layers_to_remove(total: int, ratio: float | None, num_layers: int | None) -> int:
    """Number of decoder layers to remove, from `ratio` (fraction of `total`) or `num_layers`.

    A ratio is rounded to the nearest whole layer, halves up (0.4375 of 32 is 14, as in the paper).
    """
    check_amount(ratio, num_layers)
    if ratio is not None:
        n = math.floor(ratio * total + 0.5 + 1e-9)  # half rounds up, unlike round()
        if n < 1 or n >= total:
            raise ValueError(
                f"method.ratio={ratio} removes {n} of {total} layers; it must remove between "
                f"1 and {total - 1} (ratio in [{0.5 / total:.4f}, {(total - 0.5) / total:.4f}))"
            )
        return n
    if not 1 <= num_layers < total:
        raise ValueError(
            f"method.num_layers={num_layers} is outside the allowed range [1, {total - 1}] "
            f"for a model of {total} layers"
        )
    return num_layers


class LayerTracker:
    """Maps current layer positions back to the model's original layer indices."""

    def __init__(self, total: int) -> None:
        self.original = list(range(total))

    def remove(self, position: int) -> int:
        return self.original.pop(position)

    def __getitem__(self, position: int) -> int:
        return self.original[position]


def check_counts(counts: Sequence[int], total: int) -> list[int]:
    """Removal counts for `progressive`: strictly ascending, each in [0, total-1]."""
    counts = [int(c) for c in counts]
    if not counts or any(b <= a for a, b in pairwise(counts)):
        raise ValueError(f"counts={counts} must be a non-empty strictly ascending list")
    if counts[0] < 0 or counts[-1] >= total:
        raise ValueError(
            f"counts={counts} must lie in [0, {total - 1}] for a model of {total} layers"
        )
    return counts


def last_point(points: Iterator[tuple[int, dict]]) -> dict:
    """The stats of the final point of a `progressive` walk (how `compress` uses it)."""
    stats: dict = {}
    for _, point_stats in points:
        stats = point_stats
    return stats


def remove_by_original_index(model, tracker: LayerTracker, originals: Iterable[int]) -> None:
    """Remove the layers whose ORIGINAL indices are `originals` and update the tracker."""
    positions = sorted(tracker.original.index(o) for o in originals)
    if not positions:
        return
    remove_layers(model, positions)
    for position in reversed(positions):
        tracker.remove(position)


def capture_for(method, model, calib):
    """`capture_hidden_states` with a method's capture settings (same attribute names)."""
    return capture_hidden_states(
        model,
        calib,
        representation=method.representation,
        max_points=method.max_points,
        batch_size=method.batch_size,
        cache=method.cache,
        seed=method.seed,
    )


def check_max_points(max_points: int) -> None:
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points={max_points!r} must be an integer >= 1")


class LayerMethod:
    """What the layer methods share: `compress` is the last point of their `progressive` walk."""

    ratio: float | None
    num_layers: int | None

    def compress(self, model, calib) -> dict:
        n = layers_to_remove(count_layers(model), self.ratio, self.num_layers)
        return last_point(self.progressive(model, calib, [n]))

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        raise NotImplementedError


def set_capture(method, representation: str, max_points: int, batch_size, cache, seed: int) -> None:
    """Validate and store the activation-capture settings that `capture_for` reads."""
    check_representation(representation)
    check_max_points(max_points)
    method.representation, method.max_points, method.seed = representation, max_points, seed
    method.batch_size, method.cache = batch_size, cache


def check_layer_bounds(method: Any, amounts: list[tuple], model: dict[str, Any]) -> None:
    """A layer method's amounts (ratio, num_layers) per point, and LaCo's `m`, against the
    model's layer count read from its config or GGUF header, before the weights load."""
    from mka_exp.models.declared import model_layers

    if not isinstance(method, LayerMethod):
        return
    total = model_layers(model)
    if total is None:
        return
    for ratio, count in amounts:
        layers_to_remove(total, ratio, count)
    if hasattr(method, "check_m"):  # LaCo: m layers merged into one per step
        method.check_m(total)
