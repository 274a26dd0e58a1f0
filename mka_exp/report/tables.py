"""The paper-shaped tables (Tables 1, 2, 3-4) with the published numbers beside ours, and
markdown rendering of any table."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mka_exp.report.loading import PAPER_TASKS, TASKS, cell

if TYPE_CHECKING:
    from mka_exp.report.analysis import Stats

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
# Paper ratios are printed to 5 decimals and step by ≥ 1/80: this tolerance matches one point only.
RATIO_TOL = 1e-3


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
    columns += [c for task in TASKS for c in (task, f"{task}_low", f"{task}_high", f"{task}_paper")]
    return finish(runs, columns)


def table3_4(df: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Paper Tables 3-4: the MMLU compression curve, one row per retained-layer count."""
    runs = df[(df["quantizer"] == "none") & df["mmlu"].notna()]
    runs = with_paper(runs, paper, ("mmlu",))
    columns = ["model", "method", "variant", "layers_before", "layers_after"]
    columns += ["compression_ratio", "mmlu", "mmlu_low", "mmlu_high", "mmlu_paper"]
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
    """A GitHub-markdown table (no tabulate dependency); blanks for missing values; a column's
    `<name>_low`/`<name>_high` columns are shown in its cell as `value [low, high]`."""
    if table.empty:
        return "_no matching runs_\n"
    table = fold_intervals(table)
    digits = [2 if is_accuracy(c) else None for c in table.columns]
    rows = table.itertuples(index=False)
    cells = [[cell(v, d) for v, d in zip(row, digits, strict=True)] for row in rows]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def fold_intervals(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for name in [c for c in table if {f"{c}_low", f"{c}_high"} <= set(table)]:
        digits = 2 if is_accuracy(name) else None
        bounds = zip(table[name], table[f"{name}_low"], table[f"{name}_high"], strict=True)
        out[name] = [
            cell(v, digits) + (f" [{cell(lo, digits)}, {cell(hi, digits)}]" if pd.notna(lo) else "")
            for v, lo, hi in bounds
        ]
        out = out.drop(columns=[f"{name}_low", f"{name}_high"])
    return out


def is_accuracy(column_name: str) -> bool:
    name = column_name.removesuffix("_paper").removesuffix("_low").removesuffix("_high")
    return name in TASKS


def with_intervals(df: pd.DataFrame, st: Stats | None) -> pd.DataFrame:
    """`<task>_low`/`<task>_high` (%) beside each task column, from the per-example records
    (NaN where a run has none); the interval of the metric the column holds (MMLU: macro)."""
    out = df.copy()
    for task in TASKS:
        names = [f"{task} acc_macro", f"{task} acc"] if task == "mmlu" else [f"{task} acc"]
        for bound in ("low", "high"):
            out[f"{task}_{bound}"] = np.nan
            for name in reversed(names):  # the first name wins
                if st is None or st.accuracy.empty:
                    break
                rows = st.accuracy[st.accuracy["column"] == name].set_index("config_hash")
                mapped = out["config_hash"].map(100 * rows[bound]) if "config_hash" in out else None
                if mapped is not None:
                    out[f"{task}_{bound}"] = mapped.where(mapped.notna(), out[f"{task}_{bound}"])
    return out


TITLES = {
    "table1": "Table 1: compression + quantization → MMLU",
    "table2": "Table 2: methods × compression ratio → five tasks",
    "table3_4": "Tables 3-4: MMLU vs retained layers",
}


def write_tables(tables: dict[str, pd.DataFrame], out: Path) -> None:
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(f"## {TITLES[name]}\n\n{markdown(table)}")
