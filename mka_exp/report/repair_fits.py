"""How well each repaired run's linear maps fit: on the tokens they were fitted on and on
held-out tokens they never saw.

A repair's accuracy against its unrepaired twin says whether it helped; these say why not or
why: a map that halves the cut's error on its own tokens but not on held-out ones overfits (the
5 k-token fits of issue 28), one that halves it on both explains the cut's effect on hidden states
and may still move no answer. Read from `record["repair_stats"]["fits"]` (one entry per fitted
span): relative residuals ‖MT − (L − Y)‖/‖L − Y‖ before (M = 0) and after, the same on the held-out
tokens when the calibration set had them, and the least-squares fit's held-out residual (ridge
scale s = 0 of the grid) where `repair.ridge=auto` tried it. A run of several fits shows their
mean and range.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mka_exp.report.sensitivity import ID_COLUMNS

RESIDUALS = ("residual_before", "residual_after", "heldout_residual_before",
             "heldout_residual_after")  # fmt: skip


def fit_rows(accuracy: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    """One row per repaired run with fits: tokens, ridge scales and the residuals' means (and
    ranges) over its fits."""
    rows = []
    for _, run in accuracy.drop_duplicates("config_hash").iterrows():
        repair = (records.get(run["config_hash"], {}) or {}).get("repair_stats") or {}
        fits = repair.get("fits") or []
        if fits:
            rows.append({k: run[k] for k in ID_COLUMNS} | summary(repair, fits))
    return pd.DataFrame(rows)


def summary(repair: dict, fits: list[dict]) -> dict:
    row = {"fits": len(fits), "tokens": repair.get("tokens"),
           "heldout_tokens": repair.get("heldout_tokens"), "ridge": repair.get("ridge"),
           "scales": sorted({scale_of(f) for f in fits} - {None})}  # fmt: skip
    for key in (*RESIDUALS, "heldout_least_squares"):
        values = [v for v in (value_of(f, key) for f in fits) if v is not None]
        row[key] = float(np.mean(values)) if values else np.nan
        row[f"{key}_min"] = float(min(values)) if values else np.nan
        row[f"{key}_max"] = float(max(values)) if values else np.nan
    return row


def value_of(fit: dict, key: str) -> float | None:
    if key != "heldout_least_squares":
        return fit.get(key)
    zero = [g["heldout_residual"] for g in fit.get("ridge_grid") or [] if g.get("scale") == 0]
    return zero[0] if zero else None


def scale_of(fit: dict) -> float | None:
    """The grid's scale s of the ridge the fit kept (auto), if it searched one."""
    chosen = [g["scale"] for g in fit.get("ridge_grid") or [] if g.get("ridge") == fit.get("ridge")]
    return chosen[0] if chosen else None


def fit_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows as the document prints them: `mean (min–max)` where a run has several fits."""
    return pd.DataFrame({
        "method": rows["method"], "variant": rows["variant"], "removed": rows["removed"],
        "fits": rows["fits"], "fit tokens": rows["tokens"].map(count_text),
        "held-out tokens": rows["heldout_tokens"].map(count_text),
        "ridge scale s": rows["scales"].map(lambda s: ", ".join(f"{v:g}" for v in s)),
        "fit tokens: before → after": rows.apply(arrow, axis=1, args=("residual",)),
        "held-out: before → after": rows.apply(arrow, axis=1, args=("heldout_residual",)),
        "held-out, least squares (s = 0)": rows.apply(spread, axis=1,
                                                      args=("heldout_least_squares",)),
    })  # fmt: skip


def arrow(row: pd.Series, stem: str) -> str:
    before, after = spread(row, f"{stem}_before"), spread(row, f"{stem}_after")
    return f"{before} → {after}" if before and after else "not measured"


def spread(row: pd.Series, key: str) -> str:
    mean, low, high = row[key], row[f"{key}_min"], row[f"{key}_max"]
    if pd.isna(mean):
        return ""
    return f"{mean:.3f}" if low == high else f"{mean:.3f} ({low:.3f}–{high:.3f})"


def count_text(value: object) -> str:
    return "" if value is None or pd.isna(value) else f"{int(value):,}"
