"""Figures: accuracy vs compression per model and task, similarity heatmaps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mka_exp.plots import similarity_heatmap
from mka_exp.report.analysis import CHANCE
from mka_exp.report.loading import METHOD_ORDER, TASKS

# ---------------------------------------------------------------- figures


def new_figure(size: tuple[float, float] = (6.5, 4.5)) -> Figure:
    """A bare Agg figure: no pyplot state, no display, safe in any process."""
    fig = Figure(figsize=size, layout="constrained")  # fits labels without a second draw pass
    FigureCanvasAgg(fig)
    return fig


def curve_plots(
    df: pd.DataFrame, paper: pd.DataFrame, out: Path, chance: dict | None = None
) -> list[Path]:
    """Accuracy vs compression ratio per model and task, one line per method (paper Fig. 2),
    with 95 % error bars where per-example records give them, the dense model and chance."""
    runs = df[df["quantizer"] == "none"]
    chance = chance or {task: (level, "random guess") for task, level in CHANCE.items()}
    paths = []
    for model, group in runs.groupby("model"):
        for task in TASKS:
            if group[task].notna().any():
                paths.append(curve_plot(group, paper, str(model), task, out, chance.get(task)))
    return paths


def curve_plot(
    runs: pd.DataFrame,
    paper: pd.DataFrame,
    model: str,
    task: str,
    out: Path,
    chance: tuple[float, str] | None = None,
) -> Path:
    fig = new_figure()
    ax = fig.add_subplot()
    plot_ours(ax, runs[runs[task].notna()], task)
    plot_references(ax, runs[runs[task].notna()], task, chance)
    published = paper[(paper["model"] == model) & (paper["task"] == task)]
    plot_paper(ax, published[published["quantizer"] == "none"])
    xlabel = "compression ratio (fraction of layers removed; of weights for sparsegpt)"
    ax.set(xlabel=xlabel, ylabel=f"{task} acc (%)", title=f"{model}: {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, out / "plots" / f"curve_{model}_{task}.png")


def method_color(method: str) -> str:
    """One colour per method, shared by our line and the paper's points."""
    order = list(METHOD_ORDER)
    return f"C{order.index(method) if method in order else len(order)}"


def plot_ours(ax: Axes, runs: pd.DataFrame, task: str) -> None:
    """A solid line per method and variant (variants differ by marker)."""
    markers = "osD^v<>"
    for method, lines in runs.groupby("method", sort=False):  # `runs` is in METHOD_ORDER
        for i, (variant, line) in enumerate(lines.groupby("variant", sort=False)):
            line = line.sort_values("compression_ratio")
            label = f"{method} ({variant})" if variant else method
            style = {"color": method_color(str(method)), "marker": markers[i % len(markers)]}
            low, high = line.get(f"{task}_low"), line.get(f"{task}_high")
            if low is not None and low.notna().any():
                yerr = np.vstack([line[task] - low, high - line[task]])
                ax.errorbar(line["compression_ratio"], line[task], yerr=yerr, fmt="-",
                            capsize=3, label=label, **style)  # fmt: skip
            else:
                ax.plot(line["compression_ratio"], line[task], "-", label=label, **style)


def plot_references(
    ax: Axes, runs: pd.DataFrame, task: str, chance: tuple[float, str] | None
) -> None:
    """The dense model's accuracy and the task's chance level as horizontal lines."""
    dense = runs[(runs["method"] == "none") & (runs["compression_ratio"] == 0)]
    if len(dense):
        value = float(dense[task].iloc[0])
        ax.axhline(value, color="grey", linestyle=":", label=f"dense ({value:.1f})")
    if chance is not None:
        level, how = chance
        ax.axhline(100 * level, color="black", linestyle="--", linewidth=0.8, alpha=0.6,
                   label=f"chance ({how}, {100 * level:.1f})")  # fmt: skip


def plot_paper(ax: Axes, published: pd.DataFrame) -> None:
    """The published points as faint dashed lines, coloured like our method's line."""
    published = published.drop_duplicates(["method", "compression_ratio"])  # Tables 1-3 overlap
    for method, points in published.groupby("method"):
        points = points.sort_values("compression_ratio")
        style = {"color": method_color(str(method)), "alpha": 0.5, "label": f"{method} (paper)"}
        ax.plot(points["compression_ratio"], points["acc"], "x--", **style)


def heatmaps(root: Path, out: Path) -> list[Path]:
    """A heatmap for every similarity_*.npy under the outputs dir, named after its run dir."""
    paths = []
    for npy in sorted(root.rglob("similarity_*.npy")):
        if out.resolve() in npy.resolve().parents:
            continue
        run_dir = npy.parent.relative_to(root)
        name = "_".join((*run_dir.parts, npy.stem)).replace(" ", "_")
        title = f"{run_title(npy.parent)}{npy.stem.replace('_', ' ')}"
        try:
            paths.append(similarity_heatmap(np.load(npy), out / "heatmaps" / f"{name}.png", title))
        except (ValueError, OSError) as err:  # one bad file must not sink the report
            warnings.warn(f"skipping {npy}: {err}", RuntimeWarning, stacklevel=2)
    return paths


def run_title(run_dir: Path) -> str:
    """`model method ratio: ` from the run's results.json, or nothing."""
    try:
        record = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return ""
    ratio = record.get("layer_ratio")
    ratio_text = f" {ratio:.3g}" if isinstance(ratio, float | int) else ""
    return f"{record.get('model', '?')} {record.get('method', '?')}{ratio_text}: "


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
