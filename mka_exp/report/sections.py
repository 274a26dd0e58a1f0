"""The statistics as markdown: per model, accuracies with intervals, cost, comparisons."""

from __future__ import annotations

import pandas as pd

from mka_exp.report import comparisons, stats
from mka_exp.report.analysis import Stats
from mka_exp.report.cells import interval_cell, of_model, percent, pivot
from mka_exp.report.loading import column_order, run_label
from mka_exp.report.retained import load_literature
from mka_exp.report.sensitivity import layer_choice
from mka_exp.report.tables import markdown

# ---------------------------------------------------------------- statistics as markdown


def stats_markdown(st: Stats, records: dict[str, dict]) -> str:
    """Sections per model: accuracies with intervals, then one comparison per layer count."""
    lines = [f"- {t}" for t in st.notes[st.notes["model"].isna()]["text"]]
    for (model, quant), acc in st.accuracy.groupby(["model", "quantizer"], sort=False):
        title = model if quant == "none" else f"{model} + {quant}"
        lines += [f"\n## {title}\n", examples_line(acc) + "\n", ACCURACY_HEADING]
        lines.append(accuracy_table(acc, records))
        lines += one_answer_lines(st, model, quant)
        lines += [COST_HEADING, cost_table(acc, records)]
        lines += comparisons.model_sections(st, model, quant, int(acc["layers_before"].iloc[0]))
        lines += distance_section(st, model, quant)
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


def bounded(interval: object, scale: float = 100.0, digits: int = 1) -> str:
    """`value [low, high]` of a stats.Interval, times `scale`."""
    v, lo, hi = (scale * x for x in (interval.value, interval.low, interval.high))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def distance_section(st: Stats, model: str, quant: str) -> list[str]:
    """Runs with per-choice log-likelihoods against their dense run (only those: older records
    lack them); then the declared run-vs-run comparisons in KL with their power."""
    rows = of_model(st.distance, model, quant) if not st.distance.empty else st.distance
    if rows.empty:
        return []
    table = pd.DataFrame({
        "method": rows["method"], "variant": rows["variant"], "removed": rows["removed"],
        "task": rows["task"], "flips %": rows["flips"].map(bounded),
        "correct→wrong %": rows["correct_to_wrong"].map(bounded),
        "wrong→correct %": rows["wrong_to_correct"].map(bounded),
        "KL (nats)": rows["kl"].map(lambda i: bounded(i, 1, 3)),
        "Δ log p(gold)": rows["gold_delta"].map(lambda i: bounded(i, 1, 3))})  # fmt: skip
    lines = [DISTANCE_HEADING, markdown(table)]
    pairs = of_model(st.distance_pairs, model, quant) if not st.distance_pairs.empty else None
    if pairs is not None and not pairs.empty:
        power = pd.DataFrame({
            "removed": pairs["removed"], "comparison": pairs["comparison"], "task": pairs["task"],
            "Δ KL (nats)": pairs["kl"].map(lambda i: bounded(i, 1, 3)),
            "Δ flips %": pairs["flips"].map(bounded),
            "examples for 80 % power: accuracy": pairs["n_acc"].map(count),
            "KL": pairs["n_kl"].map(count), "ratio": pairs["ratio"].map(lambda r: f"{r:.1f}")})  # fmt: skip
        lines += [DISTANCE_PAIRS_HEADING, markdown(power)]
    return lines


def count(n: float) -> str:
    return "∞ (no difference seen)" if n == float("inf") else f"{n:,.0f}"


DISTANCE_HEADING = """
### Distance to the dense model

Each compressed run against its model's dense run on the same examples, from the per-choice
log-likelihoods: flips (the `acc` answer changed; split correct→wrong and wrong→correct), the mean
KL divergence from the dense model's softmax over the choices to the compressed model's, and the
mean change of the gold answer's log-probability, each with a 95 % bootstrap interval over the
examples (each example's dense and compressed values resampled together).
"""

DISTANCE_PAIRS_HEADING = """
Declared run-vs-run comparisons in these terms (A minus B, paired by example), and the examples a
paired test needs for 80 % power at α = 0.05 to detect the observed difference: of accuracy and
of KL, each from its own per-example differences; the ratio is accuracy's over KL's.
"""


# ---------------------------------------------------------------- retained accuracy


def retained_section(st: Stats, boot_resamples: int = stats.N_RESAMPLES) -> str:
    """Per model, each run at 25 % of the layers (or the nearest cuts either side) as % of
    dense; then the published figures for other models, labelled as such."""
    lines = [RETAINED_HEADING.format(resamples=boot_resamples, seed=stats.SEED)]
    for model, rows in st.retained.groupby("model", sort=False) if not st.retained.empty else []:
        lines += retained_table(st, model, rows)
    lines += [f"- {text}" for text in st.retained_notes]
    return "\n".join(lines) + "\n" + literature_text(load_literature())


def retained_table(st: Stats, model: str, rows: pd.DataFrame) -> list[str]:
    """One model's runs at its cut(s) nearest 25 %, each row naming its cut."""
    layers = int(rows["layers_before"].iloc[0])
    cuts = sorted({int(r) for r in st.accuracy[st.accuracy["model"] == model]["removed"]} - {0})
    shown = " and ".join(str(int(c)) for c in sorted(set(rows["removed"])))
    rows = rows.sort_values("removed", kind="stable")
    rows = rows.assign(
        cut=[f"{int(r)} of {layers} ({100 * r / layers:.1f} %)" for r in rows["removed"]]
    )
    wide = pivot(rows, retained_cells(st, rows), ["config_hash", "cut", "method", "variant"])
    return [f"\n### {model}\n",
            f"Cuts with records: {', '.join(map(str, cuts))} of {layers} layers; shown: {shown}. "
            f"Dense run: {dense_text(rows, st.chance)}.\n", markdown(wide.drop(columns="run"))]  # fmt: skip


def retained_cells(st: Stats, rows: pd.DataFrame) -> pd.Series:
    """`share [low, high]` in % of dense; † where the run gives one answer to the task."""
    one = st.one_answer
    flagged = set() if one.empty else set(zip(one["config_hash"], one["task"], strict=True))
    cells = [f"{percent(r['retained'])} [{percent(r['low'])}, {percent(r['high'])}]"
             + (" †" if (r["config_hash"], r["task"]) in flagged else "")
             for _, r in rows.iterrows()]  # fmt: skip
    return pd.Series(cells, index=rows.index)


def dense_text(rows: pd.DataFrame, chance: dict[str, tuple[float, str]]) -> str:
    """Each column's dense accuracy, and chance as a share of it: a run near that share kept
    nothing of what the dense model knew beyond guessing."""
    dense = rows.drop_duplicates("column").sort_values("column", key=lambda c: c.map(column_order))
    return "; ".join(f"{r['column']} {percent(r['dense_accuracy'])} ({r['n']} examples"
                     + chance_share(chance.get(r["task"]), r["dense_accuracy"]) + ")"
                     for _, r in dense.iterrows())  # fmt: skip


def chance_share(level: tuple[float, str] | None, dense: float) -> str:
    if level is None or not dense:
        return ""
    return f"; {level[1]} {percent(level[0])} = {percent(level[0] / dense)} % of dense"


def literature_text(lit: pd.DataFrame) -> str:
    table = pd.DataFrame({
        "source": lit["source"], "model": lit["model"], "method": lit["method"],
        "compression": lit["compression"].map(lambda c: f"{100 * c:g} %"), "task": lit["task"],
        "accuracy": lit["accuracy"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}"),
        "dense": lit["dense_accuracy"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}"),
        "% of dense": lit["retained_pct"].map(lambda v: f"{v:.1f}"),
        "protocol": lit["protocol"], "citation": lit["citation"]})  # fmt: skip
    claims = [f"- {r['source']}, {r['model']} {r['method']} at {100 * r['compression']:g} %: "
              f"{r['claim']}" for _, r in lit[lit["claim"].notna()].iterrows()]  # fmt: skip
    heading = LITERATURE_HEADING.format(models=", ".join(dict.fromkeys(lit["model"])))
    return heading + "\n" + markdown(table) + "\n" + "\n".join(claims) + "\n"


RETAINED_HEADING = """
## Retained accuracy beside the literature

Each compressed run's accuracy as a share of its dense model's on the same examples (% of dense,
95 % interval), at 25 % of the model's decoder layers removed, the fraction the literature
reports at (7 of 28 on Qwen-1.5B). Where no run exists at that fraction, the nearest cuts with
records below and above it stand in, and every row names its cut. Unquantized runs; one metric
per task, `acc` (MMLU: the macro average over subjects). The interval is a paired
percentile bootstrap: an example's compressed and dense outcomes are resampled together (MMLU: by
subject, then question), {resamples:,} resamples, seed {seed}. † marks a run that gives one answer
to at least 90 % of the task's examples (its accuracy there is a base rate). `retained.csv` in the
report's output holds these rows as fractions.
"""

LITERATURE_HEADING = """
### Published figures: other models, other protocols (not a reproduction)

These are other models ({models}), evaluated by their authors with their own protocols,
prompts and examples. They stand here for scale beside the rows above, not as numbers
this project reproduces or tests against. The MKA paper's shares are its printed accuracy over
its printed dense accuracy (`mka_exp/paper_results.csv`, the dense row of the same file);
ReplaceMe's is the figure as issue 28 states it. Source: `mka_exp/report/literature.csv`.
"""
