"""Figures from run artifacts: layer-similarity heatmaps (the paper's Fig. 3).

A similarity matrix has 1.0 on its diagonal and, on real models, off-diagonal values far below it;
scaled to [min, 1] the structure between layers is invisible. So the diagonal is masked (drawn
grey, its value named in the title) and the colours span the off-diagonal values only; both axes
carry layer indices and merged pairs are outlined.

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no
display needed, safe in worker processes.

Example (what an MKA run writes): ``similarity_heatmap(S, "similarity_before.png", "before",
pairs=[(28, 29), (27, 28)])``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

PAIR_COLOUR = "red"
# More layers than this: label every second (fourth, ...) layer so the ticks stay readable.
MAX_TICKS = 32
# Off-diagonal values spanning at least this factor are coloured on a log scale.
LOG_SPAN = 10.0


def offdiagonal_limits(array: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite off-diagonal values; None when there are none."""
    values = array[~np.eye(*array.shape, dtype=bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def heatmap_figure(
    matrix: np.ndarray,
    title: str,
    pairs: Sequence[tuple[int, int]] | None = None,
    layer_ids: Sequence[int | str] | None = None,
) -> Figure:
    """The heatmap as a Figure: diagonal masked, colours over the off-diagonal range.

    `layer_ids` label the rows/columns (default 0..L-1; e.g. the original indices of the layers
    left after merging); `pairs` are (layer id, layer id) cells outlined on both sides of the
    diagonal (MKA's merged pairs on the matrix before merging).
    """
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"similarity_heatmap needs a square 2-D matrix, got shape {array.shape}")
    n = array.shape[0]
    ids = list(range(n)) if layer_ids is None else list(layer_ids)
    if len(ids) != n:
        raise ValueError(f"layer_ids has {len(ids)} labels for a {n} x {n} matrix")
    fig = Figure(figsize=(6.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    limits = offdiagonal_limits(array)
    masked = np.ma.masked_array(array, mask=np.eye(n, dtype=bool))
    image = ax.imshow(
        masked, cmap=grey_bad_cmap(), norm=colour_norm(limits), interpolation="nearest"
    )
    scale = "log scale, " if isinstance(image.norm, LogNorm) else ""
    fig.colorbar(image, ax=ax, label=f"similarity ({scale}off-diagonal range)")
    step = max(1, -(-n // MAX_TICKS))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [str(ids[t]) for t in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [str(ids[t]) for t in ticks], fontsize=7)
    merged = any(str(layer).endswith("*") for layer in ids)
    ax.set_xlabel("layer (* = merged layer)" if merged else "layer")
    ax.set_ylabel("layer")
    mark_pairs(ax, pairs or [], ids)
    note = diagonal_note(array) + (f"; {PAIR_COLOUR} outline: merged pair" if pairs else "")
    ax.set_title(f"{title}\n{note}", fontsize=10)
    return fig


def colour_norm(limits: tuple[float, float] | None) -> Normalize:
    """Linear over the off-diagonal range; logarithmic when it spans a decade or more (a few
    strongly similar pairs would otherwise flatten every other value into one colour)."""
    if limits is None:
        return Normalize()
    low, high = limits
    if low > 0 and high / low >= LOG_SPAN:
        return LogNorm(low, high)
    return Normalize(low, high)


def grey_bad_cmap():
    """viridis with masked cells (the diagonal) in light grey."""
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="lightgrey")


def diagonal_note(array: np.ndarray) -> str:
    diagonal = np.diag(array)
    if np.allclose(diagonal, diagonal[0], equal_nan=True):
        return f"diagonal masked (all {diagonal[0]:.3g})"
    return f"diagonal masked ({np.nanmin(diagonal):.3g} to {np.nanmax(diagonal):.3g})"


def mark_pairs(ax, pairs: Sequence[tuple[int, int]], ids: list) -> None:
    """Outline cells (i, j) and (j, i) of each pair, given as layer ids on the axes."""
    position = {layer: index for index, layer in enumerate(ids)}
    for a, b in pairs:
        if a not in position or b not in position:
            raise ValueError(f"merged pair ({a}, {b}) names a layer not on the axes: {ids}")
        i, j = position[a], position[b]
        for row, col in {(i, j), (j, i)}:
            ax.add_patch(
                Rectangle(
                    (col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=PAIR_COLOUR, linewidth=1.5
                )
            )


def similarity_heatmap(
    matrix: np.ndarray,
    path: str | Path,
    title: str,
    pairs: Sequence[tuple[int, int]] | None = None,
    layer_ids: Sequence[int | str] | None = None,
) -> Path:
    """A [L, L] layer-similarity matrix as a PNG heatmap (see `heatmap_figure`), written atomically."""
    fig = heatmap_figure(matrix, title, pairs, layer_ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def merge_marks(name: str, array: np.ndarray, merges: Sequence[dict] | None) -> dict:
    """How a method's similarity artifact shows its merges (`merges`: MKA's keep/drop records).

    Before merging: the merged (keep, drop) pairs outlined, in original layer indices. After
    merging: the axes labelled with the original indices of the layers left, `*` where a layer
    absorbed others.
    """
    if not merges:
        return {}
    dropped = {m["drop"] for m in merges}
    kept = {m["keep"] for m in merges}
    if name.endswith("before"):
        return {"pairs": [(m["keep"], m["drop"]) for m in merges]}
    total = array.shape[0] + len(dropped)
    if name.endswith("after"):
        left = [i for i in range(total) if i not in dropped]
        return {"layer_ids": [f"{i}*" if i in kept else str(i) for i in left]}
    return {}
