"""Cells and pivots shared by the markdown sections."""

from __future__ import annotations

import pandas as pd

from mka_exp.report.loading import column_order


def percent(value: float, sign: bool = False) -> str:
    return "" if pd.isna(value) else f"{100 * value:{'+' if sign else ''}.1f}"


def interval_cell(row: pd.Series) -> str:
    return f"{percent(row['value'])} [{percent(row['low'])}, {percent(row['high'])}]"


def p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def pivot(long: pd.DataFrame, cells: pd.Series, index: list[str]) -> pd.DataFrame:
    """One row per run, one column per task metric (in the paper's task order)."""
    wide = long.assign(cell=cells).pivot_table(
        index=index, columns="column", values="cell", aggfunc="first", sort=False
    )
    wide = wide[sorted(wide.columns, key=column_order)].fillna("")
    return wide.reset_index().rename(columns={"config_hash": "run"})


def of_model(frame: pd.DataFrame, model: str, quant: str) -> pd.DataFrame:
    """The rows of one model + quantizer (each model's section of the statistics)."""
    return frame[(frame["model"] == model) & (frame["quantizer"] == quant)]
