"""The method comparison document (`--markdown`): a generated header and the statistics, then
whatever the old file kept below its KEPT line."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mka_exp.report import declared, stats
from mka_exp.report.analysis import BEST_PRUNING, MARK, PRUNING_METHODS, Stats
from mka_exp.report.comparisons import detected
from mka_exp.report.loading import ReportError, load_records
from mka_exp.report.sections import retained_section
from mka_exp.results.files import write_bytes_atomic

if TYPE_CHECKING:
    import pandas as pd

    from mka_exp.report.cli import Report
    from mka_exp.report.declared import Declaration


def methods_text(st: Stats | None, boot_resamples: int = stats.N_RESAMPLES) -> str:
    """The method paragraph: intervals, tests, the baseline's choice, the declaration, power."""
    return (
        "\n".join(
            [
                "Accuracies in %, each with a 95 % interval: Wilson score for one task, a bootstrap over "
                "subjects and their questions for MMLU's macro average "
                f"({boot_resamples:,} resamples, seed {stats.SEED}).",
                "",
                "Paired comparisons (a run against another on the same examples): the difference in "
                "points with Newcombe's closed-form 95 % paired interval (his method 10: the two Wilson "
                "intervals combined with the pairs' correlation; no resampling, so no seed moves it; MMLU's "
                "macro average: a paired bootstrap by subject and question), McNemar's exact p on the "
                "discordant examples (pooled), and the minimum detectable difference (MDE) at 80 % power, "
                "α = 0.05, from the comparison's n and observed discordance (MDE = (z₀.₉₇₅ + z₀.₈) · "
                "√(discordant share / n); per subject for MMLU). An interval endpoint within 1e-12 of 0 "
                "touches 0. Exploratory cells call a difference detected when its interval excludes 0 "
                "and p < 0.05 (unadjusted). "
                'A difference not shown reads "not detected (MDE x)": a real difference '
                "smaller than the MDE may well exist.",
                "",
                f"Baseline: {baseline_text(st)}",
                "",
                declaration_text(st),
                "",
                distance_text(st),
            ]
        )
        + "\n"
    )


def baseline_text(st: Stats | None) -> str:
    pool = st.baseline if st is not None and st.baseline != BEST_PRUNING else (
        f"a pruning method ({', '.join(PRUNING_METHODS)}; any variant and repair)")  # fmt: skip
    return (f"per column and layer count, the most accurate run of {pool}, chosen by "
            "cross-fitting so that no example both picks the baseline and tests against it: the "
            "examples are split in two halves (within each subject, by doc_id: 1st, 3rd, ... to "
            "half A, the others to B; deterministic), the run most accurate on half B supplies the "
            "baseline's outcomes on half A and the run most accurate on half A those on half B. "
            "Each comparison table names the runs chosen.")  # fmt: skip


def declaration_text(st: Stats | None) -> str:
    decls = [] if st is None else st.declarations
    if not decls:
        return ("Declared comparisons: none (no `compare.yaml` beside the records, no `compare` in "
                "their configs), so every comparison is exploratory: unadjusted, and no cell is "
                "marked.")  # fmt: skip
    texts = [one_declaration_text(d, declared_part(st.primary, d)) for d in decls]
    head = "" if len(decls) == 1 else (
        f"{len(decls)} declarations, each over its own records (both sides of its comparisons, "
        "its families and its α). ")  # fmt: skip
    return head + " ".join(texts) + (" Every other comparison is exploratory: unadjusted p, no "
                                     "mark.")  # fmt: skip


def declared_part(primary: pd.DataFrame, decl: Declaration) -> pd.DataFrame:
    if primary.empty or "declaration" not in primary:
        return primary
    return primary[primary["declaration"] == decl.source]


def one_declaration_text(decl: Declaration, primary: pd.DataFrame) -> str:
    when = ("declared before the runs" if decl.when == "before the runs" else
            "declared retrospectively, after the data had been seen: they are not pre-registered, "
            "and a reader should weigh them as chosen with the results in view")  # fmt: skip
    pairs = "; ".join(f"{a.label()} − {b.label()}" for a, b in decl.primary) or "none"
    twins = " and each repaired run against its unrepaired twin" if decl.repair_twins else ""
    return (f"Declared comparisons ({source_names(decl.source)}; {when}): {pairs}{twins}, on "
            f"{', '.join(decl.metrics)} (MMLU: its macro average). A family is one model × "
            "quantizer × layer count: all declared comparisons there, over all tasks; Holm's "
            f"step-down correction holds the family-wise error at α = {decl.alpha:g} within each. "
            f"Only these cells carry a mark (`{MARK}` = Holm-adjusted p < {decl.alpha:g}; the "
            "mark uses McNemar's exact p only, so it has no seed); the unadjusted and adjusted "
            f"p stand beside each other. {mark_counts(primary)}")  # fmt: skip


def source_names(source: str) -> str:
    """A merged declaration's sources; the records that each carry it (`config.compare`, one
    per run of a declared grid) counted, not listed."""
    names = source.split(", ")
    carried = [k for k in map(declared.carried_record, names) if k is not None]
    if len(carried) < 2:
        return ", ".join(f"`{n}`" for n in names)
    files = [f"`{n}`" for n in names if declared.carried_record(n) is None]
    shown = ", ".join(carried[:3]) + (", ..." if len(carried) > 3 else "")
    return ", ".join([*files, f"`config.compare` of {len(carried)} records ({shown})"])


def distance_text(st: Stats | None) -> str:
    """Whether the distance-to-dense sections exist, and why not."""
    runs = 0 if st is None or st.distance.empty else st.distance["config_hash"].nunique()
    total = 0 if st is None else st.accuracy["config_hash"].nunique()
    if runs:
        removing = st.accuracy.loc[st.accuracy["removed"] > 0, "config_hash"].nunique()
        return (f"Distance to the dense model (flips, KL, gold log-probability): {runs} of the "
                f"{removing} runs that remove layers keep per-choice log-likelihoods "
                "(`choice_ll`) and have a dense run that does; each model's section shows them.")  # fmt: skip
    return (f"Distance to the dense model (flips, KL over the choices, gold log-probability): none "
            f"of these {total} runs keeps per-choice log-likelihoods (`choice_ll` in the "
            "per-example records; older evaluations did not write them), so this document has no "
            "such section. Runs whose per-example records carry `choice_ll` get them.")  # fmt: skip


def mark_counts(primary) -> str:
    if primary.empty:
        return "No declared comparison has records here."
    unadjusted = int((primary["p_value"] < 0.05).sum())
    return (f"Of the {len(primary)} declared comparisons in {families(primary)} families, "
            f"{unadjusted} have unadjusted p < 0.05 and {int(primary['significant'].sum())} stay marked after "
            "Holm's correction.")  # fmt: skip


GENERATED = "<!-- generated by `python -m mka_exp.report --markdown`: edit only below KEPT -->"
KEPT = "<!-- KEPT: everything below this line survives when the report regenerates the file -->"


def write_comparison_doc(path: Path, report: Report, sources: list[Path], command: str) -> Path:
    """The method comparison document: the generated header and statistics, then whatever the
    old file kept below the KEPT line (a hand-written file is kept whole, under a heading)."""
    if report.stats is None:
        raise ReportError(f"--markdown needs an outputs dir with records/, not {sources[0]}")
    records = {k: v for s in reversed(sources) for k, v in load_records(s).items()}
    header = comparison_header(report.stats, records, sources, command)
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = figures_section(report.plots, path.parent / FIGURES)
    summary = summary_section(report.stats)
    retained = retained_section(report.stats)
    text = (
        f"{GENERATED}\n{header}\n{summary}{figures}{report.statistics}{retained}\n{KEPT}\n\n"
        f"{kept_part(path)}"
    )
    write_bytes_atomic(path, text.rstrip("\n").encode() + b"\n")
    return path


FIGURES = "figures"  # beside the document, committed with it


def figures_section(plots: list[Path], into: Path) -> str:
    """Copy the figures next to the document (replacing the old ones) and embed each with a
    relative link."""
    if into.exists():
        for old in into.glob("curve_*.png"):
            old.unlink()
    into.mkdir(parents=True, exist_ok=True)
    lines = ["## Figures\n"]
    for plot in plots:
        shutil.copyfile(plot, into / plot.name)
        lines.append(f"![{plot.stem}]({FIGURES}/{plot.name})\n")
    return "\n".join(lines) + "\n" if plots else ""


def summary_section(st: Stats) -> str:
    """Per model, the counts a reading quotes, from the records: declared comparisons and marks,
    their MDEs, merging against pruning, and runs that give one answer."""
    lines = ["## Summary (generated from the records)\n"]
    for model in sorted(set(st.accuracy["model"])):
        parts = [
            declared_counts(st, model),
            merging_counts(st, model),
            one_answer_counts(st, model),
        ]
        lines.append(f"- **{model}.** " + " ".join(p for p in parts if p))
    return "\n".join(lines) + "\n\n"


def declared_counts(st: Stats, model: str) -> str:
    rows = st.primary[st.primary["model"] == model] if not st.primary.empty else st.primary
    if rows.empty:
        return "No declared comparison."
    mde = 100 * rows["mde"].dropna()
    span = f"; their MDE {mde.min():.1f}–{mde.max():.1f} points" if len(mde) else ""
    return (f"{len(rows)} declared comparisons in {families(rows)} families: "
            f"{int(rows['significant'].sum())} marked after Holm ({int((rows['p_value'] < 0.05).sum())}"
            f" with unadjusted p < 0.05){span}.")  # fmt: skip


def merging_counts(st: Stats, model: str) -> str:
    rows = st.merging[st.merging["model"] == model] if not st.merging.empty else st.merging
    if rows.empty:
        return ""
    above = int((detected(rows) & (rows["difference"] > 0)).sum())
    below = int((detected(rows) & (rows["difference"] < 0)).sum())
    return (f"Best merging against best pruning (both cross-fitted; exploratory): above in {above},"
            f" below in {below}, not detected in {len(rows) - above - below} of {len(rows)} "
            "columns × cuts.")  # fmt: skip


def one_answer_counts(st: Stats, model: str) -> str:
    rows = st.one_answer[st.one_answer["model"] == model] if not st.one_answer.empty else None
    if rows is None or rows.empty:
        return "No run gives one answer to a task."
    counts = ", ".join(f"{task} {n}" for task, n in rows.groupby("task", sort=False).size().items())
    return f"Runs giving one answer to at least 90 % of a task's examples: {counts}."


FAMILY_KEYS = declared.FAMILY


def families(primary: pd.DataFrame) -> int:
    """Holm families: one model × quantizer × layer count within one declaration."""
    keys = FAMILY_KEYS + (["declaration"] if "declaration" in primary else [])
    return primary.groupby(keys).ngroups


def kept_part(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    if KEPT in text:
        return text.split(KEPT, 1)[1].lstrip("\n")
    if text.startswith(GENERATED):
        return ""
    return "## Previous hand-written version (kept)\n\n" + text.replace("\n# ", "\n### ")


def comparison_header(
    st: Stats, records: dict[str, dict], sources: list[Path], command: str
) -> str:
    runs = [r for r in records.values() if r.get("config_hash") in set(st.accuracy["config_hash"])]
    models = sorted({f"{r.get('model')} ({r.get('layers_before')} layers)" for r in runs})
    protocols = sorted({eval_protocol(r.get("config") or {}) for r in runs})
    versions = sorted({str(r.get("code_version", "?")) for r in runs})
    chance = ", ".join(f"{t} {100 * v:.1f} ({how})" for t, (v, how) in st.chance.items())
    return "\n".join([
        "# Method comparison\n",
        f"Generated on {time.strftime('%Y-%m-%d')} from {len(runs)} run records with per-example "
        f"records in {', '.join(f'`{s}`' for s in sources)} by\n\n```bash\n{command}\n```\n",
        f"- Models: {', '.join(models) or 'none'}.",
        f"- Evaluation: {'; '.join(protocols) or 'none'} (examples per task under each model).",
        f"- Code versions: {', '.join(versions)}.",
        f"- Chance levels drawn in the plots: {chance}.\n",
        methods_text(st),
    ])  # fmt: skip


def eval_protocol(config: dict) -> str:
    ev = config.get("eval") or {}
    tasks = set(ev.get("tasks") or [])
    shots = {t: n for t, n in (ev.get("num_fewshot") or {}).items() if t in tasks}
    shot_text = ", ".join(f"{t} {n}-shot" for t, n in sorted(shots.items())) or "all 0-shot"
    seed = ev.get("sample_seed")
    chosen = "the first examples" if seed is None else f"a draw with sample_seed {seed}"
    return (
        f"tasks {', '.join(ev.get('tasks') or [])}, limit {ev.get('limit')} ({chosen}), {shot_text}"
    )
