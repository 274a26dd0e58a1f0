"""Paper-style report from many runs: our numbers beside the paper's, as tables and figures.

    python -m mka_exp.report outputs/ [--out DIR] [--wandb]
    python -m mka_exp.report outputs/results.csv

Reads the run table (an outputs dir is rebuilt from its `records/`, so it is always complete; a
CSV is read as is) and writes into `--out` (default `<outputs dir>/report`):

- `table1.{md,csv}`  model × method × quantizer → MMLU and compression ratio (paper Table 1)
- `table2.{md,csv}`  model × method × compression ratio → MMLU, PIQA, HellaSwag, RACE-H, BoolQ
- `table3_4.{md,csv}` model × method × retained layers → MMLU (paper Tables 3-4)
- `plots/curve_<model>_<task>.png`  accuracy vs compression ratio, one line per method (Fig. 2)
- `heatmaps/*.png`  every `similarity_*.npy` found under the outputs dir (Fig. 3)
- `report.md`  an index of all of the above

Accuracies are in percent like the paper's; each `<task>_paper` column holds the published
number (`mka_exp/paper_results.csv`) where model, method, quantizer and ratio (or retained layers)
match. MMLU is the macro average over subjects when a run has it (the paper's script averaged per
subject), else lm-eval's group score. Runs of one method that differ in other settings (λ, pair
choice, calibration, ...) get a `variant` label built from the config keys that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mka_exp.plots import similarity_heatmap
from mka_exp.results import NON_RESULT_KEYS, rebuild_table

# Our model config names → the paper's model names.
PAPER_MODELS = {
    "llama3_8b": "Llama3-8B",
    "llama3_70b": "Llama3-70B",
    "llama2_7b": "Llama2-7B",
    "llama2_13b": "Llama2-13B",
    "mistral_7b": "Mistral-7B",
}
# Our method module names → the paper's (paper_results.csv spells them the same; angular is ours).
PAPER_METHODS = {
    "none": "none",
    "reverse_prune": "reverse_prune",
    "shortgpt": "shortgpt",
    "mka": "mka",
    "sparsegpt": "sparsegpt",
}
# Our task names → the paper's (RACE is RACE-high in both; the paper's file says race_h).
PAPER_TASKS = {
    "mmlu": "mmlu",
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "race": "race_h",
    "boolq": "boolq",
}
TASKS = tuple(PAPER_TASKS)
METHOD_ORDER = ("none", "reverse_prune", "shortgpt", "angular", "mka", "sparsegpt")
# Paper ratios are printed to 5 decimals and step by ≥ 1/80: this tolerance matches one point only.
RATIO_TOL = 1e-3
# Config keys that do not name a different experiment (where files go, how it is logged, where it
# ran) or are already a table column (ratio, layer count; a curve's points); prefixes of dotted
# keys. Runs that differ only in these still get told apart, by config hash.
NOT_VARIANT = (*NON_RESULT_KEYS, "data_root", "save", "curve")
NOT_VARIANT_LEAVES = ("ratio", "num_layers", "_target_", "data_root", "cache", "device")
NOT_VARIANT_LEAVES += ("device_map", "batch_size")
MAX_VARIANT_KEYS = 4


class ReportError(Exception):
    """Bad input (missing path, no runs): reported as one line, exit code 2."""


@dataclass
class Report:
    """What a report wrote: tables by name (with their files) and figure paths."""

    out: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- input


def load_table(path: Path) -> tuple[pd.DataFrame, Path]:
    """The run table and the outputs dir it belongs to (where similarity .npy files are sought)."""
    if not path.exists():
        raise ReportError(f"{path}: no such file or directory")
    if path.is_dir():
        table = rebuild_table(path)
        if table.empty:
            raise ReportError(f"{path}: no run records found (expected {path / 'records'}/*.json)")
        return attach_configs(table, path), path
    try:
        table = pd.read_csv(path, dtype={"config_hash": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not a readable results table ({err})") from None
    if table.empty:
        raise ReportError(f"{path}: the results table has no rows")
    return table, path.parent


def attach_configs(table: pd.DataFrame, outputs: Path) -> pd.DataFrame:
    """Add each record's resolved config as `config.<dotted key>` columns (variant labels)."""
    rows = []
    for file in sorted((outputs / "records").glob("*.json")):
        record = json.loads(file.read_text())
        flat = pd.json_normalize(record.get("config") or {}, sep=".").iloc[0].to_dict()
        row = {f"config.{k}": v if np.isscalar(v) or v is None else str(v) for k, v in flat.items()}
        rows.append({"config_hash": record.get("config_hash"), **row})
    configs = pd.DataFrame(rows)
    if "config_hash" not in table or configs.empty:
        return table
    return table.merge(configs.drop_duplicates("config_hash"), on="config_hash", how="left")


def column(table: pd.DataFrame, name: str) -> pd.Series:
    """A column as floats, or all-NaN when the table lacks it (runs evaluate different tasks)."""
    if name in table:
        return pd.to_numeric(table[name], errors="coerce")
    return pd.Series(np.nan, index=table.index)


def prepare(table: pd.DataFrame) -> pd.DataFrame:
    """Our runs with the derived columns every table and plot uses: ratio, variant, acc in %."""
    df = table.copy()
    for name, default in (("model", "?"), ("method", "?"), ("quantizer", "none")):
        df[name] = df[name].fillna(default).astype(str) if name in df else default
    df["compression_ratio"] = compression_ratio(df)
    df["paper_ratio"] = column(df, "paper_compression_ratio").fillna(df["compression_ratio"])
    # The paper averaged MMLU per subject; lm-eval's group score weights subjects by size.
    mmlu = column(df, "metrics.mmlu/acc_macro").fillna(column(df, "metrics.mmlu/acc"))
    df["mmlu"] = 100 * mmlu
    for task in TASKS[1:]:
        df[task] = 100 * column(df, f"metrics.{task}/acc")
    df["variant"] = variants(df)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    df["_order"] = df["method"].map(order).fillna(len(order))
    return df.sort_values(["model", "_order", "variant", "quantizer", "compression_ratio"])


def compression_ratio(df: pd.DataFrame) -> pd.Series:
    """Fraction removed: decoder layers for layer methods, weights for SparseGPT (its target)."""
    layers = column(df, "layer_ratio")
    if layers.isna().all() and {"layers_before", "layers_after"} <= set(df):
        layers = 1 - column(df, "layers_after") / column(df, "layers_before")
    sparsity = column(df, "method_stats.target_sparsity")
    return sparsity.where(sparsity.notna() & (layers.fillna(0) == 0), layers).round(6)


def variants(df: pd.DataFrame) -> pd.Series:
    """A label per run from the config keys that differ among runs of its model/method/quant."""
    keys = [c for c in df if c.startswith("config.") and is_variant_key(c[len("config.") :])]
    labels = pd.Series("", index=df.index)
    for _, group in df.groupby(["model", "method", "quantizer"]):
        differing = [k for k in keys if group[k].astype(str).nunique() > 1][:MAX_VARIANT_KEYS]
        for idx, row in group.iterrows():
            labels[idx] = ", ".join(f"{short_key(k)}={row[k]}" for k in differing)
    # Runs still indistinguishable (e.g. a CSV without configs): tell them apart by config hash.
    key = ["model", "method", "quantizer", "compression_ratio"]
    clash = df.assign(variant=labels).duplicated(key + ["variant"], keep=False)
    if clash.any() and "config_hash" in df:
        hashes = df.loc[clash, "config_hash"].astype(str).str[:8]
        labels[clash] = (labels[clash] + " #" + hashes).str.strip()
    return labels


def is_variant_key(key: str) -> bool:
    return not key.startswith(NOT_VARIANT) and key.rsplit(".", 1)[-1] not in NOT_VARIANT_LEAVES


def short_key(column_name: str) -> str:
    key = column_name[len("config.") :]
    return key[len("method.") :] if key.startswith("method.") else key


# ---------------------------------------------------------------- the paper's numbers


def load_paper() -> pd.DataFrame:
    """The paper's published numbers in long form, with our model and task names."""
    with resources.files("mka_exp").joinpath("paper_results.csv").open() as fh:
        paper = pd.read_csv(fh)
    models = {v: k for k, v in PAPER_MODELS.items()}
    methods = {v: k for k, v in PAPER_METHODS.items()}
    tasks = {v: k for k, v in PAPER_TASKS.items()}
    return paper.assign(
        model=paper["model"].map(models).fillna(paper["model"]),
        method=paper["method"].map(methods).fillna(paper["method"]),
        task=paper["task"].map(tasks).fillna(paper["task"]),
    )


def paper_value(paper: pd.DataFrame, run: pd.Series, task: str, by_layers: bool) -> float:
    """The published accuracy for this run's model/method/quantizer/point, NaN when none.

    Any of the paper's tables may hold the point (the baseline is in Tables 1-3, ShortGPT's
    MMLU curve only in Table 2); where tables overlap, their numbers agree."""
    hits = paper[
        (paper["model"] == run["model"])
        & (paper["method"] == run["method"])
        & (paper["quantizer"] == run["quantizer"])
        & (paper["task"] == task)
    ]
    if by_layers:  # Table 1's ratios count every quantizer as int4: match retained layers
        hits = hits[hits["retained_layers"] == run.get("layers_after")]
    else:
        hits = hits[(hits["compression_ratio"] - run["compression_ratio"]).abs() < RATIO_TOL]
    return float(hits["acc"].iloc[0]) if len(hits) else np.nan


def with_paper(
    df: pd.DataFrame,
    paper: pd.DataFrame,
    tasks: tuple[str, ...],
    by_layers: bool = False,
) -> pd.DataFrame:
    """Each task's column of ours followed by `<task>_paper`."""
    out = df.copy()
    for task in tasks:
        out[f"{task}_paper"] = [
            paper_value(paper, run, task, by_layers) for _, run in df.iterrows()
        ]
    return out


# ---------------------------------------------------------------- tables


def table1(df: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 1: compressed + quantized runs (and uncompressed baselines) → MMLU."""
    runs = df[((df["quantizer"] != "none") | (df["method"] == "none")) & df["mmlu"].notna()]
    runs = with_paper(runs, paper, ("mmlu",), by_layers=True)
    runs["compression_ratio_paper"] = [
        paper_ratio(paper, run) if pd.notna(run["mmlu_paper"]) else np.nan
        for _, run in runs.iterrows()
    ]
    columns = ["model", "method", "variant", "quantizer", "weight_bits", "layers_before"]
    columns += ["layers_after", "paper_ratio", "compression_ratio_paper", "mmlu", "mmlu_paper"]
    return finish(runs, columns).rename(columns={"paper_ratio": "compression_ratio"})


def paper_ratio(paper: pd.DataFrame, run: pd.Series) -> float:
    hits = paper[
        (paper["table"] == "table1")
        & (paper["model"] == run["model"])
        & (paper["retained_layers"] == run.get("layers_after"))
    ]
    return float(hits["compression_ratio"].iloc[0]) if len(hits) else np.nan


def table2(df: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 2: unquantized runs × compression ratio → the five tasks, ours beside paper."""
    runs = df[(df["quantizer"] == "none") & df[list(TASKS)].notna().any(axis=1)]
    runs = with_paper(runs, paper, TASKS)
    columns = ["model", "method", "variant", "compression_ratio", "layers_after"]
    columns += [c for task in TASKS for c in (task, f"{task}_paper")]
    return finish(runs, columns)


def table3_4(df: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Paper Tables 3-4: the MMLU compression curve, one row per retained-layer count."""
    runs = df[(df["quantizer"] == "none") & df["mmlu"].notna()]
    runs = with_paper(runs, paper, ("mmlu",))
    columns = ["model", "method", "variant", "layers_before", "layers_after"]
    columns += ["compression_ratio", "mmlu", "mmlu_paper"]
    return finish(runs, columns)


def finish(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Keep the table's columns (missing ones blank), accuracies to 2 decimals like the paper."""
    out = runs.reindex(columns=columns).reset_index(drop=True)
    accs = [c for c in columns if is_accuracy(c)]
    out[accs] = out[accs].astype(float).round(2)
    ratios = [c for c in columns if "ratio" in c]
    out[ratios] = out[ratios].astype(float).round(5)
    return out


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-markdown table (no tabulate dependency); blanks for missing values."""
    if table.empty:
        return "_no matching runs_\n"
    digits = [2 if is_accuracy(c) else None for c in table.columns]
    rows = table.itertuples(index=False)
    cells = [[cell(v, d) for v, d in zip(row, digits, strict=True)] for row in rows]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def is_accuracy(column_name: str) -> bool:
    return column_name.removesuffix("_paper") in TASKS


def cell(value: object, digits: int | None = None) -> str:
    """Blank for missing; accuracies with fixed decimals like the paper; else shortest form."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if digits is not None and isinstance(value, int | float):
        return f"{value:.{digits}f}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- figures


def new_figure(size: tuple[float, float] = (6.5, 4.5)) -> Figure:
    """A bare Agg figure: no pyplot state, no display, safe in any process."""
    fig = Figure(figsize=size, layout="constrained")  # fits labels without a second draw pass
    FigureCanvasAgg(fig)
    return fig


def curve_plots(df: pd.DataFrame, paper: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy vs compression ratio per model and task, one line per method (paper Fig. 2)."""
    runs = df[df["quantizer"] == "none"]
    paths = []
    for model, group in runs.groupby("model"):
        for task in TASKS:
            if group[task].notna().any():
                paths.append(curve_plot(group, paper, str(model), task, out))
    return paths


def curve_plot(runs: pd.DataFrame, paper: pd.DataFrame, model: str, task: str, out: Path) -> Path:
    fig = new_figure()
    ax = fig.add_subplot()
    plot_ours(ax, runs[runs[task].notna()], task)
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
            ax.plot(line["compression_ratio"], line[task], "-", label=label, **style)


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


# ---------------------------------------------------------------- output


TITLES = {
    "table1": "Table 1: compression + quantization → MMLU",
    "table2": "Table 2: methods × compression ratio → five tasks",
    "table3_4": "Tables 3-4: MMLU vs retained layers",
}


def write_tables(tables: dict[str, pd.DataFrame], out: Path) -> None:
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(f"## {TITLES[name]}\n\n{markdown(table)}")


def write_index(report: Report, source: Path, runs: int) -> Path:
    """report.md: every table inline (with its CSV) and every figure."""
    intro = f"{runs} runs from `{source}`. Accuracies in %; `*_paper` = published numbers "
    lines = [f"# MKA experiment report\n\n{intro}(arXiv 2406.16330) for the same point.\n"]
    for name, table in report.tables.items():
        lines.append(f"## {TITLES[name]}\n\n[{name}.csv]({name}.csv)\n\n{markdown(table)}")
    for title, paths in (
        ("Accuracy vs compression", report.plots),
        ("Similarity", report.heatmaps),
    ):
        if paths:
            lines.append(f"## {title}\n")
            lines += [f"![{p.stem}]({p.relative_to(report.out).as_posix()})\n" for p in paths]
    path = report.out / "report.md"
    path.write_text("\n".join(lines))
    return path


def log_to_wandb(report: Report) -> None:
    """Tables and figures to one wandb run (offline unless WANDB_MODE says otherwise); a wandb
    failure only warns: the report on disk is already complete."""
    try:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        run = wandb.init(project="mka-exp", job_type="report", dir=str(report.out), mode=mode)
        for name, table in report.tables.items():
            run.log({name: wandb.Table(dataframe=table.astype(object).where(table.notna(), None))})
        for path in report.plots + report.heatmaps:
            run.log({f"{path.parent.name}/{path.stem}": wandb.Image(str(path))})
        run.finish()
    except Exception as err:  # wandb may fail in many ways (network, service, disk)
        message = f"wandb logging failed ({err}); the report on disk is complete"
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def build_report(source: Path, out: Path | None = None) -> Report:
    """Read the runs, write every table and figure; returns what was written."""
    table, root = load_table(source)
    report = Report(out=out or root / "report")
    report.out.mkdir(parents=True, exist_ok=True)
    df, paper = prepare(table), load_paper()
    report.tables = {"table1": table1(df, paper), "table2": table2(df, paper)}
    report.tables["table3_4"] = table3_4(df, paper)
    write_tables(report.tables, report.out)
    report.plots = curve_plots(df, paper, report.out)
    report.heatmaps = heatmaps(root, report.out)
    write_index(report, source, len(df))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mka_exp.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", type=Path, help="an outputs dir (with records/) or a results.csv")
    parser.add_argument("--out", type=Path, default=None, help="default: <outputs dir>/report")
    parser.add_argument("--wandb", action="store_true", help="also log tables and plots to wandb")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.source, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, table in report.tables.items():
        print(f"## {TITLES[name]}\n\n{markdown(table)}")
    if args.wandb:
        log_to_wandb(report)
    print(f"report written to {report.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
