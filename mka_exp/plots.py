"""Figures from run artifacts: layer-similarity heatmaps (the paper's Fig. 3).

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no
display needed, safe in worker processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def similarity_heatmap(matrix: np.ndarray, path: str | Path, title: str) -> Path:
    """A [L, L] layer-similarity matrix as a PNG heatmap (layer index on both axes)."""
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2:
        raise ValueError(f"similarity_heatmap needs a 2-D matrix, got shape {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(array, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
