"""The statistics as markdown: per model, accuracies with intervals, cost, comparisons."""

from __future__ import annotations

import pandas as pd

from mka_exp.report.analysis import (
    BEST_PRUNING,
    MARK,
    MERGING_METHODS,
    ONE_ANSWER_SHARE,
    Stats,
    layer_choice,
)
from mka_exp.report.loading import column_order, run_label
from mka_exp.report.tables import markdown

# ---------------------------------------------------------------- statistics as markdown


def percent(value: float, sign: bool = False) -> str:
    return "" if pd.isna(value) else f"{100 * value:{'+' if sign else ''}.1f}"


def interval_cell(row: pd.Series) -> str:
    return f"{percent(row['value'])} [{percent(row['low'])}, {percent(row['high'])}]"


def difference_cell(row: pd.Series) -> str:
    if row.get("is_baseline") is True:
        return "baseline"
    mark = MARK if row["significant"] else ""
    span = f"[{percent(row['low'], True)}, {percent(row['high'], True)}]"
    return f"{percent(row['difference'], True)} {span}{mark} {p_text(row['p_value'])}"


def p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def pivot(long: pd.DataFrame, cells: pd.Series, index: list[str]) -> pd.DataFrame:
    """One row per run, one column per task metric (in the paper's task order)."""
    wide = long.assign(cell=cells).pivot_table(
        index=index, columns="column", values="cell", aggfunc="first", sort=False
    )
    wide = wide[sorted(wide.columns, key=column_order)].fillna("")
    return wide.reset_index().rename(columns={"config_hash": "run"})


def stats_markdown(st: Stats, records: dict[str, dict]) -> str:
    """Sections per model: accuracies with intervals, then one comparison per layer count."""
    lines = [f"- {t}" for t in st.notes[st.notes["model"].isna()]["text"]]
    for (model, quant), acc in st.accuracy.groupby(["model", "quantizer"], sort=False):
        title = model if quant == "none" else f"{model} + {quant}"
        lines += [f"\n## {title}\n", examples_line(acc) + "\n", ACCURACY_HEADING]
        lines.append(accuracy_table(acc, records))
        lines += one_answer_lines(st, model, quant)
        lines += [COST_HEADING, cost_table(acc, records)]
        for removed in sorted(set(acc["removed"]) - {0}):
            lines += comparison_section(
                st, model, quant, removed, int(acc["layers_before"].iloc[0])
            )
        lines += repair_section(st, model, quant)
        lines += merging_section(st, model, quant)
    if not st.sensitivity.empty:
        lines += ["\n## Calibration sensitivity\n", sensitivity_text(st.sensitivity)]
    return "\n".join(lines) + "\n"


ACCURACY_HEADING = """### Accuracy (%, 95 % interval)

"layers removed": original layer indices; for MKA and LaCo each merge as kept+merged (the kept
layer holds the merge).
"""


COST_HEADING = """
### Cost (seconds, memory)

Wall seconds of each stage as recorded (one process; a curve's later points reuse the repair's
dense capture, so its capture seconds are counted once per process). "repair holds": the dense
hidden states and the largest fit's normal equations and cached inputs the repair keeps beside
the models; "peak RSS": the whole process.
"""


def cost_table(acc: pd.DataFrame, records: dict[str, dict]) -> str:
    runs = acc.drop_duplicates("config_hash")
    rows = []
    for _, run in runs.iterrows():
        record = records.get(run["config_hash"], {})
        timings = record.get("timings") or {}
        repair = ("repair_capture", "repair")
        held = (record.get("repair_stats") or {}).get("held_bytes")
        rows.append({
            "method": run["method"], "variant": run["variant"], "removed": run["removed"],
            "method s": seconds_cell(timings.get("compress")),
            "repair s (capture + fit)": " + ".join(seconds_cell(timings.get(k)) for k in repair)
            if any(k in timings for k in repair) else "",
            "repair holds": f"{held / 2**20:,.0f} MiB" if held else "",
            "evaluate s": seconds_cell(timings.get("evaluate")),
            "peak RSS": f"{record['peak_rss_bytes'] / 2**30:.1f} GiB"
            if record.get("peak_rss_bytes") else "",
        })  # fmt: skip
    return markdown(pd.DataFrame(rows))


def seconds_cell(value: object) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else ""


def examples_line(acc: pd.DataFrame) -> str:
    parts = []
    for name in sorted(set(acc["column"]), key=column_order):
        rows = acc[acc["column"] == name]
        if name.endswith("_norm") and name.replace("acc_norm", "acc") in set(acc["column"]):
            continue
        counts = "/".join(str(n) for n in sorted(set(rows["n"])))
        groups = int(rows["groups"].max())
        parts.append(
            f"{name.split()[0]} {counts}" + (f" ({groups} subjects)" if groups > 1 else "")
        )
    return "Examples per task: " + ", ".join(parts) + "."


def accuracy_table(acc: pd.DataFrame, records: dict[str, dict]) -> str:
    wide = pivot(
        acc, acc.apply(interval_cell, axis=1), ["config_hash", "method", "variant", "removed"]
    )
    removed = [layers_text(records.get(h, {})) for h in wide["run"]]
    wide.insert(4, "layers removed", removed)
    return markdown(wide.drop(columns="run"))


def layers_text(record: dict) -> str:
    choice = layer_choice(record.get("method_stats") or {})
    if choice and isinstance(choice[0], tuple):
        return " ".join("+".join(map(str, merge)) for merge in choice)  # kept+merged
    return "" if choice is None else " ".join(map(str, choice))


def of_model(frame: pd.DataFrame, model: str, quant: str) -> pd.DataFrame:
    """The rows of one model + quantizer (each model's section of the statistics)."""
    return frame[(frame["model"] == model) & (frame["quantizer"] == quant)]


def comparison_section(st: Stats, model: str, quant: str, removed: int, total: int) -> list[str]:
    diffs = st.differences
    if not diffs.empty:
        diffs = of_model(diffs, model, quant)
        diffs = diffs[diffs["removed"] == removed]
    notes = of_model(st.notes, model, quant)
    notes = notes[notes["removed"] == removed]
    lines = [f"\n### Against {st.baseline} at {removed} of {total} layers removed\n"]
    if not diffs.empty:
        base = diffs.drop_duplicates("column").sort_values(
            "column", key=lambda c: c.map(column_order)
        )
        named = "; ".join(f"{r['column']}: {r['baseline']}" for _, r in base.iterrows())
        lines.append(f"Baseline per column: {named}. Difference in points, 95 % paired bootstrap "
                     f"interval, `{MARK}` = excludes 0, McNemar exact p.\n")  # fmt: skip
        wide = pivot(
            diffs, diffs.apply(difference_cell, axis=1), ["config_hash", "method", "variant"]
        )
        lines.append(markdown(wide.drop(columns="run")))
    lines += [f"- {text}" for text in notes["text"]]
    return lines


def repair_section(st: Stats, model: str, quant: str) -> list[str]:
    effects = st.repair
    if effects.empty:
        return []
    effects = of_model(effects, model, quant)
    if effects.empty:
        return []
    wide = pivot(effects, effects.apply(difference_cell, axis=1),
                 ["config_hash", "method", "variant", "removed"])  # fmt: skip
    return [REPAIR_HEADING, markdown(wide.drop(columns="run"))]


def merging_section(st: Stats, model: str, quant: str) -> list[str]:
    """Per layer count and column, the best merging run against the best pruning run (the
    default baseline), and what the paired interval lets one say."""
    diffs = st.differences
    if diffs.empty or st.baseline != BEST_PRUNING:  # a --baseline METHOD answers another question
        return []
    diffs = of_model(diffs, model, quant)
    diffs = diffs[diffs["method"].isin(MERGING_METHODS) & ~diffs["is_baseline"].astype(bool)]
    if diffs.empty:
        return []
    flagged = one_answer_keys(st)
    diffs = diffs.assign(one_answer=diffs.apply(lambda r: one_answer_side(flagged, r), axis=1))
    best = diffs.loc[diffs.groupby(["removed", "column"], sort=False)["difference"].idxmax()]
    best = best.sort_values(["removed", "column"], key=sort_key)
    rows = [verdict_row(r) for _, r in best.iterrows()]
    readings = diffs.apply(reading, axis=1)
    above, below = (int((readings == side).sum()) for side in ("above", "below"))
    summary = (f"Of all {len(diffs)} merging results (run × column), {above} are above the best "
               f"pruning run beyond the interval, {below} below it, the rest within it.")  # fmt: skip
    one = int((diffs["one_answer"] != "").sum())
    if one:
        summary += (f" {one} of them compare a run that gives one answer to at least "
                    f"{100 * ONE_ANSWER_SHARE:.0f} % of the task's examples (see above): a base "
                    "rate, not a difference in what the models kept.")  # fmt: skip
    return [MERGING_HEADING, markdown(pd.DataFrame(rows)), "", summary]


def verdict_row(r: pd.Series) -> dict:
    return {"removed": r["removed"], "column": r["column"], "best pruning": r["baseline"],
            "best merging": run_label(r), "difference": difference_cell(r),
            "reading": reading(r), "one answer": r["one_answer"]}  # fmt: skip


def one_answer_keys(st: Stats) -> set[tuple[str, str]]:
    """(config hash, task) of every run × task that gives one answer."""
    if st.one_answer.empty:
        return set()
    return set(zip(st.one_answer["config_hash"], st.one_answer["task"], strict=True))


def one_answer_side(flagged: set[tuple[str, str]], diff: pd.Series) -> str:
    """Which side of a paired difference gives one answer to its task: merging, pruning, both."""
    if not flagged:
        return ""
    task = diff["column"].split(" ", 1)[0]
    sides = [name for name, key in (("merging", "config_hash"), ("pruning", "baseline_hash"))
             if (diff[key], task) in flagged]  # fmt: skip
    return "both" if len(sides) == 2 else "".join(sides)


def sort_key(values: pd.Series) -> pd.Series:
    return values.map(column_order) if values.name == "column" else values


def reading(row: pd.Series) -> str:
    if not row["significant"]:
        return "within the interval"
    return "above" if row["difference"] > 0 else "below"


MERGING_HEADING = """
### Does merging beat pruning?

Per layer count and column: the most accurate merging run (mka, laco; any variant and repair)
minus the most accurate pruning run (any variant and repair), paired on the same examples
(points, 95 % paired bootstrap interval, `*` = excludes 0, McNemar p).
"""


REPAIR_HEADING = """
### Repair against the same run without it

Each repaired run minus its twin with `repair=none` (the same config otherwise), paired on the
same examples: difference in points, 95 % paired bootstrap interval, `*` = excludes 0, McNemar p.
"""


def sensitivity_text(table: pd.DataFrame) -> str:
    """Per method and point: layer choices over the seeds and each accuracy's spread."""
    out = table[["model", "method", "variant", "removed", "seeds", "layer_choices",
                 "seeds_off_most_common"]].copy()  # fmt: skip
    names = sorted({c.rsplit(" ", 1)[0] for c in table if c.endswith(" mean")}, key=column_order)
    for name in names:
        out[name] = [
            f"{percent(m)} ± {percent(s)} (range {percent(r)})" if pd.notna(m) else ""
            for m, s, r in zip(table[f"{name} mean"], table[f"{name} sd"], table[f"{name} range"],
                               strict=True)
        ]  # fmt: skip
    intro = ("Runs that differ only in `calib.seed`: distinct layer choices over the seeds, seeds "
             "whose choice differs from the most common one, and each accuracy (%) as mean ± sd "
             "(range) over the seeds.\n\n")  # fmt: skip
    return intro + markdown(out)


def one_answer_lines(st: Stats, model: str, quant: str) -> list[str]:
    flagged = of_model(st.one_answer, model, quant) if not st.one_answer.empty else st.one_answer
    return [""] * (not flagged.empty) + [
        f"- {run_label(r)} -{int(r['removed'])} gives one answer ({r['answer']}) to "
        f"{percent(r['share'])} % of {r['task']}'s {r['n']} examples; {percent(r['target_share'])}"
        f" % of the targets are {r['answer']}, so its {r['task']} accuracy is that base rate, "
        "not what the compression kept."
        for _, r in flagged.iterrows()
    ]
