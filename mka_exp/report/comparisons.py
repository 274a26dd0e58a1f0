"""The comparison sections of one model: against the cross-fitted best pruning run per layer count,
the declared comparisons (the only marked cells, Holm within each family), repair against its
twin, and merging against pruning. Every cell gives the minimum detectable difference (MDE) at 80 %
power; a difference not shown to differ from 0 reads "not detected (MDE x)"."""

from __future__ import annotations

import pandas as pd

from mka_exp.report.analysis import BEST_PRUNING, MARK, MERGING_METHODS, Stats
from mka_exp.report.cells import of_model, p_text, percent, pivot
from mka_exp.report.loading import column_order
from mka_exp.report.repair_fits import fit_table
from mka_exp.report.sensitivity import ONE_ANSWER_SHARE
from mka_exp.report.tables import markdown


def model_sections(st: Stats, model: str, quant: str, total: int) -> list[str]:
    cuts = sorted(set(of_model(st.accuracy, model, quant)["removed"]) - {0})
    lines = []
    for removed in cuts:
        lines += comparison_section(st, model, quant, removed, total)
    lines += declared_section(st, model, quant)
    lines += repair_section(st, model, quant)
    return lines + merging_section(st, model, quant)


def mde_text(mde: float) -> str:
    return "MDE n/a: no discordant example" if pd.isna(mde) else f"MDE {percent(mde)}"


def span(row: pd.Series) -> str:
    interval = f"[{percent(row['low'], True)}, {percent(row['high'], True)}]"
    return f"{percent(row['difference'], True)} {interval}"


def exploratory_cell(row: pd.Series) -> str:
    """Difference [interval] p, and whether the interval lets one say anything: no mark."""
    verdict = f" ({mde_text(row['mde'])})" if detected(row) else f", {not_detected(row)}"
    return f"{span(row)} {p_text(row['p_value'])}{verdict}"


def detected(row: pd.Series | pd.DataFrame) -> bool | pd.Series:
    """Unadjusted (exploratory) reading: the interval excludes 0 and McNemar's p < 0.05 (they
    rarely disagree; where they do, "not detected" is the careful reading)."""
    return row["excludes_zero"] & (row["p_value"] < 0.05)


def not_detected(row: pd.Series) -> str:
    return f"not detected ({mde_text(row['mde'])})"


def declared_cell(row: pd.Series) -> str:
    """Difference [interval] p, Holm's p, the mark when Holm's p < alpha, else not detected."""
    holm = f"Holm {p_text(row['p_holm'])}"
    verdict = f"{MARK} ({mde_text(row['mde'])})" if row["significant"] else not_detected(row)
    return f"{span(row)} {p_text(row['p_value'])}, {holm} {verdict}"


def comparison_section(st: Stats, model: str, quant: str, removed: int, total: int) -> list[str]:
    diffs = st.differences
    if not diffs.empty:
        diffs = of_model(diffs, model, quant)
        diffs = diffs[diffs["removed"] == removed]
    notes = of_model(st.notes, model, quant)
    notes = notes[notes["removed"] == removed]
    title = f"{st.baseline} (cross-fitted)"
    lines = [f"\n### Against {title} at {removed} of {total} layers removed (exploratory)\n"]
    if not diffs.empty:
        base = of_model(st.baselines, model, quant)
        base = base[base["removed"] == removed].sort_values(
            "column", key=lambda c: c.map(column_order)
        )
        named = "; ".join(f"{r['column']}: {r['baseline']}" for _, r in base.iterrows())
        lines.append(f"Baseline per column: {named}. Difference in points, 95 % paired interval "
                     "(Newcombe; MMLU: bootstrap), McNemar exact p, unadjusted and unmarked.\n")  # fmt: skip
        cells = diffs.apply(exploratory_cell, axis=1)
        wide = pivot(diffs, cells, ["config_hash", "method", "variant"])
        lines.append(markdown(wide.drop(columns="run")))
    lines += [f"- {text}" for text in notes["text"]]
    return lines


def declared_section(st: Stats, model: str, quant: str) -> list[str]:
    if st.primary.empty:
        return []
    rows = of_model(st.primary, model, quant)
    rows = rows[rows["kind"] == "pair"]
    if rows.empty:
        return []
    rows = rows.sort_values(["removed", "column"], key=sort_key, kind="stable")
    table = pd.DataFrame({
        "removed": rows["removed"].astype(int), "comparison": rows["comparison"],
        "column": rows["column"], "difference [95 %]": rows.apply(span, axis=1),
        "p": rows["p_value"].map(p_text), "Holm p (family size)": [
            f"{p_text(p)} ({m})" for p, m in zip(rows["p_holm"], rows["family_size"], strict=True)],
        "reading": rows.apply(reading, axis=1)})  # fmt: skip
    return [DECLARED_HEADING, markdown(table)]


def reading(row: pd.Series) -> str:
    if not row["significant"]:
        return not_detected(row)
    return f"{MARK} {'above' if row['difference'] > 0 else 'below'} ({mde_text(row['mde'])})"


def repair_section(st: Stats, model: str, quant: str) -> list[str]:
    effects = st.repair
    if effects.empty or of_model(effects, model, quant).empty:
        return []
    effects = of_model(effects, model, quant)
    declared = st.primary[st.primary["kind"] == "repair"] if not st.primary.empty else None
    if declared is not None and not declared.empty:
        keyed = declared.set_index(["config_hash", "column"])
        cells = [declared_cell(keyed.loc[(r["config_hash"], r["column"])])
                 if (r["config_hash"], r["column"]) in keyed.index else exploratory_cell(r)
                 for _, r in effects.iterrows()]  # fmt: skip
        heading = REPAIR_HEADING + REPAIR_DECLARED
    else:
        cells, heading = effects.apply(exploratory_cell, axis=1), REPAIR_HEADING + EXPLORATORY
    wide = pivot(effects, pd.Series(cells, index=effects.index),
                 ["config_hash", "method", "variant", "removed"])  # fmt: skip
    return [heading, markdown(wide.drop(columns="run")), *fits_part(st, model, quant)]


def fits_part(st: Stats, model: str, quant: str) -> list[str]:
    rows = of_model(st.repair_fits, model, quant) if not st.repair_fits.empty else st.repair_fits
    if rows.empty:
        return []
    return [FITS_TEXT, markdown(fit_table(rows.sort_values(["removed", "method"])))]


def merging_section(st: Stats, model: str, quant: str) -> list[str]:
    """Per layer count and column: the cross-fitted best merging run minus the cross-fitted best
    pruning run (exploratory)."""
    if st.merging.empty or st.baseline != BEST_PRUNING:
        return []
    rows = of_model(st.merging, model, quant)
    if rows.empty:
        return []
    rows = rows.sort_values(["removed", "column"], key=sort_key)
    flagged = one_answer_keys(st)
    table = pd.DataFrame({
        "removed": rows["removed"].astype(int), "column": rows["column"],
        "best merging": rows["merging"], "best pruning": rows["pruning"],
        "difference": rows.apply(exploratory_cell, axis=1),
        "one answer": rows.apply(lambda r: one_answer_side(flagged, r), axis=1)})  # fmt: skip
    above = int((detected(rows) & (rows["difference"] > 0)).sum())
    below = int((detected(rows) & (rows["difference"] < 0)).sum())
    summary = (f"Of these {len(rows)} comparisons, the interval and p < 0.05 put merging above pruning in "
               f"{above} and below it in {below}; in the other {len(rows) - above - below} a "
               "difference is not detected (each with its MDE). Exploratory: unadjusted.")  # fmt: skip
    one = int((table["one answer"] != "").sum())
    if one:
        summary += (f" {one} of them involve a run that gives one answer to at least "
                    f"{100 * ONE_ANSWER_SHARE:.0f} % of the task's examples (see above): a base "
                    "rate, not a difference in what the models kept.")  # fmt: skip
    return [MERGING_HEADING.format(methods=", ".join(MERGING_METHODS)), markdown(table), "",
            summary]  # fmt: skip


def one_answer_keys(st: Stats) -> set[tuple[str, str]]:
    """(config hash, task) of every run × task that gives one answer."""
    if st.one_answer.empty:
        return set()
    return set(zip(st.one_answer["config_hash"], st.one_answer["task"], strict=True))


def one_answer_side(flagged: set[tuple[str, str]], diff: pd.Series) -> str:
    """Which side of a paired difference gives one answer to its task: merging, pruning, both
    (a side may be two runs, one per half: either counts)."""
    if not flagged:
        return ""
    task = diff["column"].split(" ", 1)[0]
    sides = [name for name, key in (("merging", "config_hash"), ("pruning", "baseline_hash"))
             if any((h, task) in flagged for h in str(diff[key]).split("+"))]  # fmt: skip
    return "both" if len(sides) == 2 else "".join(sides)


def sort_key(values: pd.Series) -> pd.Series:
    return values.map(column_order) if values.name == "column" else values


DECLARED_HEADING = f"""
### Declared comparisons (Holm within each layer count)

The comparisons the declaration names (see the method paragraph), each paired on the same
examples: difference in points with its 95 % interval, McNemar's exact p unadjusted and Holm's
adjusted p beside it (family: this model at this layer count, every declared comparison and task
in it; family size in brackets). `{MARK}` = Holm's p < 0.05; otherwise "not detected" with the
minimum detectable difference at 80 % power (MDE, points), never "no difference".
"""

REPAIR_HEADING = """
### Repair against the same run without it

Each repaired run minus its twin with `repair=none` (the same config otherwise), paired on the
same examples: difference in points, 95 % paired interval, McNemar exact p"""
REPAIR_DECLARED = f""", Holm's p in the
declared family (see above) and `{MARK}` where it is < 0.05. Columns outside the declared metrics
are exploratory (no Holm p, no mark).
"""
FITS_TEXT = """
How well the repaired runs' maps fit (`repair_stats`): the relative residual
‖MT − (L − Y)‖/‖L − Y‖ of each fitted span before the map (the cut alone) and after it, on the
tokens it was fitted on and on held-out tokens it never saw; with `ridge=auto`, the grid scale s
it kept and the least-squares (s = 0) held-out residual. A run with several fits shows their mean
(min–max). A held-out "after" well below "before" says the map explains that share of the cut's
effect on text it did not see; far above the fit tokens' "after", that it overfits.
"""
EXPLORATORY = """; exploratory
(nothing declared): unadjusted and unmarked.
"""

MERGING_HEADING = """
### Does merging beat pruning? (exploratory)

Per layer count and column: the best merging run ({methods}; any variant and repair) minus the
best pruning run (any variant and repair), each chosen by cross-fitting (on one half of the
examples, tested on the other), paired on the same examples.
"""
