"""Figures: accuracy vs compression per model and task, similarity heatmaps."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mka_exp.methods import registry
from mka_exp.report.analysis import CHANCE
from mka_exp.report.loading import TASKS
from mka_exp.results.plots import similarity_heatmap

# ---------------------------------------------------------------- figures


def new_figure(size: tuple[float, float] = (6.5, 4.5)) -> Figure:
    """A bare Agg figure: no pyplot state, no display, safe in any process."""
    fig = Figure(figsize=size, layout="constrained")  # fits labels without a second draw pass
    FigureCanvasAgg(fig)
    return fig


PANEL = (4.0, 3.2)  # inches per task panel
LINESTYLES = ("-", "--", ":", "-.")  # a method's variants differ by line style, then fill


def curve_plots(
    df: pd.DataFrame, paper: pd.DataFrame, out: Path, chance: dict | None = None
) -> list[Path]:
    """Accuracy vs compression ratio per model: one panel per task (small multiples), one line
    per method and variant (paper Fig. 2), 95 % error bars where per-example records give them,
    the dense model and chance labelled on their lines; one legend below the panels."""
    runs = df[df["quantizer"] == "none"]
    chance = chance or {task: (level, "random guess") for task, level in CHANCE.items()}
    paths = []
    for model, group in runs.groupby("model"):
        tasks = [task for task in TASKS if group[task].notna().any()]
        if tasks:
            paths.append(curve_figure(group, paper, str(model), tasks, out, chance))
    return paths


def curve_figure(
    runs: pd.DataFrame, paper: pd.DataFrame, model: str, tasks: list[str], out: Path, chance: dict
) -> Path:
    cols = 1 if len(tasks) == 1 else 2
    rows = -(-len(tasks) // cols)
    labels = legend_labels(runs)
    ncols = 1 if len(labels) <= LEGEND_ROWS else 2
    height = max(PANEL[1] * rows + 0.5, LINE_HEIGHT * legend_lines(labels, ncols) + 0.8)
    fig = new_figure((PANEL[0] * cols + LEGEND_WIDTH * ncols, height))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks, strict=False):
        have = runs[runs[task].notna()]
        plot_ours(ax, have, task)
        plot_references(ax, have, task, chance.get(task))
        published = paper[(paper["model"] == model) & (paper["task"] == task)]
        plot_paper(ax, published[published["quantizer"] == "none"])
        ax.set(title=task, ylabel="accuracy (%)", xlabel=XLABEL)
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks) :]:
        ax.set_axis_off()
    fig.suptitle(model, x=0.01, ha="left", fontsize="medium")  # the legend holds the right
    handles, labels = legend_entries(axes[: len(tasks)])
    fig.legend(handles, [wrap(x) for x in labels], loc="outside right upper", fontsize="x-small",
               ncols=ncols)  # fmt: skip
    return save(fig, out / "plots" / f"curve_{model}.png")


XLABEL = "fraction removed (layers; weights for sparsegpt)"
LEGEND_WIDTH = 2.9  # inches right of the panels, per legend column
LEGEND_ROWS = 16  # entries in one legend column before a second one
LINE_HEIGHT = 0.16  # inches per legend text line at x-small
SPREAD = 0.03  # x range over which a point's lines are spread, so their error bars stay apart
TASKS_LABEL = re.compile(r"tasks=[^,)]*(, )?")


def legend_labels(runs: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(line_label_text(m, v) for m, v in zip(runs["method"],
                                                                    runs["variant"], strict=True)))  # fmt: skip


def legend_lines(labels: list[str], ncols: int) -> int:
    return -(-sum(wrap(x).count("\n") + 1 for x in labels) // ncols)


def line_label_text(method: object, variant: object) -> str:
    """`method (variant)` without the evaluated task list (each panel is one task)."""
    variant = TASKS_LABEL.sub("", str(variant or "")).strip(", ")
    return f"{method} ({variant})" if variant else str(method)


def wrap(label: str, width: int = 40) -> str:
    """Long variant labels over two lines (at a comma), so the legend stays narrow."""
    if len(label) <= width or ", " not in label:
        return label
    cut = label.rfind(", ", 0, width)
    cut = cut if cut > 0 else label.find(", ")
    return label[: cut + 1] + "\n  " + label[cut + 2 :]


def legend_entries(axes) -> tuple[list, list[str]]:
    """Each label once over all panels (the dense and chance lines are labelled on the panel)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if not label.startswith(("dense", "chance")):
                seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def method_style(method: str, index: int) -> dict:
    """The registry's colour and marker; the i-th variant's line style (hollow after four)."""
    entry = registry.info(method)
    return {"color": entry.color, "marker": entry.marker,
            "linestyle": LINESTYLES[index % len(LINESTYLES)],
            "fillstyle": "full" if index < len(LINESTYLES) else "none"}  # fmt: skip


def plot_ours(ax: Axes, runs: pd.DataFrame, task: str) -> None:
    """A line per method and variant, in the registry's display order."""
    count = runs[runs["compression_ratio"] > 0].groupby(["method", "variant"]).ngroups
    dodge, k = SPREAD / max(count - 1, 1), 0
    for method, lines in runs.groupby("method", sort=False):  # `runs` is in display order
        for i, (variant, line) in enumerate(lines.groupby("variant", sort=False)):
            line = line.sort_values("compression_ratio")
            if (line["compression_ratio"] > 0).any():  # the dense point stays at 0
                line = line.assign(compression_ratio=line["compression_ratio"]
                                   + dodge * (k - (count - 1) / 2))  # fmt: skip
                k += 1
            label = line_label_text(method, variant)
            style = method_style(str(method), i)
            low, high = line.get(f"{task}_low"), line.get(f"{task}_high")
            if low is not None and low.notna().any():
                yerr = np.vstack([line[task] - low, high - line[task]])
                ax.errorbar(line["compression_ratio"], line[task], yerr=yerr, capsize=2,
                            markersize=4, label=label, **style)  # fmt: skip
            else:
                ax.plot(line["compression_ratio"], line[task], markersize=4, label=label, **style)


def plot_references(
    ax: Axes, runs: pd.DataFrame, task: str, chance: tuple[float, str] | None
) -> None:
    """The dense model's accuracy and the task's chance level as horizontal lines, each labelled
    on the line itself (right end) and in the line's label."""
    dense = runs[(runs["method"] == "none") & (runs["compression_ratio"] == 0)]
    if len(dense):
        value = float(dense[task].iloc[0])
        ax.axhline(value, color="grey", linestyle=":", label=f"dense ({value:.1f})")
        line_label(ax, value, f"dense {value:.1f}", "grey")
    if chance is not None:
        level, how = chance
        ax.axhline(100 * level, color="black", linestyle="--", linewidth=0.8, alpha=0.6,
                   label=f"chance ({how}, {100 * level:.1f})")  # fmt: skip
        line_label(ax, 100 * level, f"chance ({how}) {100 * level:.1f}", "black")


def line_label(ax: Axes, y: float, text: str, color: str) -> None:
    """The label on the line's left part, right of the dense point, where no compressed run
    sits (their ratios start at one layer removed)."""
    ax.annotate(text, xy=(0.06, y), xycoords=("axes fraction", "data"), xytext=(0, 2),
                textcoords="offset points", ha="left", va="bottom", fontsize="x-small",
                color=color)  # fmt: skip


def plot_paper(ax: Axes, published: pd.DataFrame) -> None:
    """The published points as faint dashed lines, coloured like our method's line."""
    published = published.drop_duplicates(["method", "compression_ratio"])  # Tables 1-3 overlap
    for method, points in published.groupby("method"):
        points = points.sort_values("compression_ratio")
        style = {
            "color": registry.info(str(method)).color,
            "alpha": 0.5,
            "label": f"{method} (paper)",
        }
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
