"""Similarity heatmaps: colours over the off-diagonal range, diagonal masked, pairs outlined."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import LogNorm, Normalize
from matplotlib.patches import Rectangle

from mka_exp.pipeline import save_artifacts
from mka_exp.results.plots import heatmap_figure, merge_marks, similarity_heatmap


def matrix(n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.05, 0.2, size=(n, n))
    np.fill_diagonal(values, 1.0)
    return values


def outlined(fig) -> set[tuple[int, int]]:
    """(row, col) of every outlined cell."""
    ax = fig.axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    return {(round(r.get_y() + 0.5), round(r.get_x() + 0.5)) for r in rects}


def test_colours_span_the_off_diagonal_values_and_the_diagonal_is_masked():
    values = matrix()
    fig = heatmap_figure(values, "before")
    image = fig.axes[0].images[0]
    off = values[~np.eye(6, dtype=bool)]
    assert image.get_clim() == pytest.approx((off.min(), off.max()))
    data = image.get_array()
    assert data.mask.diagonal().all() and not data.mask[~np.eye(6, dtype=bool)].any()
    assert "diagonal masked (all 1)" in fig.axes[0].get_title()


def test_a_wide_off_diagonal_range_is_coloured_on_a_log_scale():
    values = matrix()
    values[0, 1] = values[1, 0] = 0.9  # one strongly similar pair, the rest 0.05-0.2
    image = heatmap_figure(values, "before").axes[0].images[0]
    assert isinstance(image.norm, LogNorm) and image.get_clim() == pytest.approx(
        (values[values > 0].min(), 0.9)
    )
    assert isinstance(heatmap_figure(matrix(), "x").axes[0].images[0].norm, Normalize)
    assert not isinstance(heatmap_figure(matrix(), "x").axes[0].images[0].norm, LogNorm)


def test_axes_carry_layer_indices_and_merged_pairs_are_outlined():
    fig = heatmap_figure(matrix(), "before", pairs=[(4, 5), (3, 4)])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(6)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(6)]
    assert outlined(fig) == {(4, 5), (5, 4), (3, 4), (4, 3)}
    assert ax.get_title().endswith("red outline: merged pair")


def test_pairs_follow_the_layer_ids_on_the_axes():
    fig = heatmap_figure(matrix(4), "after", pairs=[(0, 7)], layer_ids=[0, 2, 5, 7])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "2", "5", "7"]
    assert outlined(fig) == {(0, 3), (3, 0)}
    with pytest.raises(ValueError, match=r"merged pair \(1, 2\) names a layer not on the axes"):
        heatmap_figure(matrix(4), "after", pairs=[(1, 2)], layer_ids=[0, 2, 5, 7])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"square 2-D matrix, got shape \(2, 3\)"):
        heatmap_figure(np.zeros((2, 3)), "x")
    with pytest.raises(ValueError, match="layer_ids has 2 labels for a 3 x 3 matrix"):
        heatmap_figure(np.eye(3), "x", layer_ids=[0, 1])


def test_mka_merges_mark_the_before_matrix_and_label_the_after_matrix():
    merges = [{"keep": 4, "drop": 5}, {"keep": 3, "drop": 4}]  # adjacent_back on 6 layers
    assert merge_marks("similarity_before", matrix(), merges) == {"pairs": [(4, 5), (3, 4)]}
    after = merge_marks("similarity_after", matrix(4), merges)
    assert after == {"layer_ids": ["0", "1", "2", "3*"]}
    assert merge_marks("similarity_before", matrix(), None) == {}


def test_run_artifacts_are_drawn_with_their_merges(tmp_path):
    merges = [{"keep": 4, "drop": 5}]
    artifacts = {"similarity_before": matrix(), "similarity_after": matrix(5)}
    save_artifacts(artifacts, tmp_path, merges)
    for name in artifacts:
        assert np.load(tmp_path / f"{name}.npy").shape == artifacts[name].shape
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))


def test_png_is_written_whole(tmp_path):
    path = similarity_heatmap(matrix(), tmp_path / "sub" / "s.png", "s", pairs=[(0, 1)])
    assert path == tmp_path / "sub" / "s.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == ["s.png"]
