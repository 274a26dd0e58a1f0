"""The statistics as markdown: per model, accuracies with intervals, cost, comparisons."""

from __future__ import annotations

import pandas as pd

from mka_exp.report import comparisons
from mka_exp.report.analysis import Stats
from mka_exp.report.cells import interval_cell, of_model, percent, pivot
from mka_exp.report.loading import column_order, run_label
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
