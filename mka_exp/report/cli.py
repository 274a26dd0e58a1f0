"""Build the report from outputs dirs and the command line (`python -m mka_exp.report`)."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mka_exp.report import selection, stats
from mka_exp.report.analysis import PRUNING_METHODS, Boot, Stats, compute_stats
from mka_exp.report.declared import load_declarations
from mka_exp.report.document import methods_text, write_comparison_doc
from mka_exp.report.figures import curve_plots, heatmaps
from mka_exp.report.loading import ReportError, load_records, load_table, prepare
from mka_exp.report.sections import stats_markdown
from mka_exp.report.tables import (
    TITLES,
    load_paper,
    markdown,
    table1,
    table2,
    table3_4,
    with_intervals,
    write_tables,
)
from mka_exp.results import samples as samples_mod


@dataclass
class Report:
    """What a report wrote: tables by name (with their files) and figure paths."""

    out: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)
    stats: Stats | None = None
    statistics: str = ""  # the statistics sections as markdown


def write_index(report: Report, source: Path, runs: int) -> Path:
    """report.md: every table inline (with its CSV) and every figure."""
    intro = f"{runs} runs from `{source}`. Accuracies in %; `*_paper` = published numbers "
    lines = [f"# MKA experiment report\n\n{intro}(arXiv 2406.16330) for the same point.\n"]
    if report.statistics:
        lines.append(
            f"## Intervals and paired tests\n\n{methods_text(report.stats)}\n{report.statistics}"
        )
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


def merged_outputs(sources: list[Path], into: Path) -> Path:
    """One outputs dir whose records/ links every record (and per-example file) of several
    outputs dirs, e.g. the evidence folders of several models in one comparison document. The
    same config hash in two sources is the same run: the first source's record is used."""
    for source in sources:
        if not (source / "records").is_dir():
            raise ReportError(
                f"{source}: several sources must each be an outputs dir with records/"
            )
    records = into / "records"
    if records.exists():
        shutil.rmtree(records)
    records.mkdir(parents=True)
    for source in sources:
        for path in sorted((source / "records").glob("*")):
            link = records / path.name
            if path.is_file() and not link.exists():
                link.symlink_to(path.resolve())
    return into


def build_report(
    source: Path | list[Path],
    out: Path | None = None,
    baseline: str | None = None,
    resamples: int = stats.N_RESAMPLES,
    seed: int = stats.SEED,
) -> Report:
    """Read the runs, write every table and figure; returns what was written. Several sources
    (outputs dirs) are read as one, through links under `out`/sources, which must then be given.
    The declared comparisons come from each source's compare.yaml and the records' configs."""
    sources = source if isinstance(source, list) else [source]
    if isinstance(source, list):
        if len(source) > 1 and out is None:
            raise ReportError("several sources need --out DIR (where the report goes)")
        source = merged_outputs(source, out / "sources") if len(source) > 1 else source[0]
    table, root = load_table(source)
    report = Report(out=out or root / "report")
    report.out.mkdir(parents=True, exist_ok=True)
    df, paper = prepare(table), load_paper()
    if source.is_dir():
        declarations = load_declarations([s for s in sources if s.is_dir()], load_records(root))
        boot = Boot(resamples, seed)
        report.stats = compute_stats(df, root, baseline, boot, declarations)
        report.statistics = stats_markdown(report.stats, load_records(root))
        write_stats(report.stats, report.statistics, report.out)
    elif baseline:
        raise ReportError(f"--baseline {baseline}: paired tests need an outputs dir, not {source}")
    df = with_intervals(df, report.stats)
    report.tables = {"table1": table1(df, paper), "table2": table2(df, paper)}
    report.tables["table3_4"] = table3_4(df, paper)
    write_tables(report.tables, report.out)
    chance = report.stats.chance if report.stats else None
    report.plots = curve_plots(df, paper, report.out, chance)
    report.heatmaps = heatmaps(root, report.out)
    write_index(report, source, len(df))
    return report


def write_stats(st: Stats, text: str, out: Path) -> None:
    st.accuracy.to_csv(out / "accuracy_intervals.csv", index=False)
    st.differences.to_csv(out / "paired_differences.csv", index=False)
    st.sensitivity.to_csv(out / "calibration_sensitivity.csv", index=False)
    st.one_answer.to_csv(out / "one_answer.csv", index=False)
    st.primary.to_csv(out / "declared_comparisons.csv", index=False)
    st.retained.to_csv(out / "retained.csv", index=False)
    st.repair_fits.to_csv(out / "repair_fits.csv", index=False)
    flat = (
        st.distance.map(lambda v: getattr(v, "value", v)) if not st.distance.empty else st.distance
    )
    flat.to_csv(out / "distance_to_dense.csv", index=False)
    (out / "statistics.md").write_text(
        f"# Intervals and paired tests\n\n{methods_text(st)}\n{text}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["select-best"]:  # the pruning method chosen before a test (selection.py)
        try:
            return selection.main(argv[1:])
        except (ReportError, samples_mod.SamplesError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(
        prog="python -m mka_exp.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "source",
        type=Path,
        nargs="+",
        help="an outputs dir (with records/) or a results.csv; or several outputs dirs, read as one",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: <outputs dir>/report (one source)"
    )
    parser.add_argument("--wandb", action="store_true", help="also log tables and plots to wandb")
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="METHOD",
        help="compare every run with this method at the same layer count "
        f"(default: the best of {', '.join(PRUNING_METHODS)} there)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the method comparison document (e.g. docs/method_comparison.md)",
    )
    parser.add_argument("--resamples", type=int, default=stats.N_RESAMPLES, help="bootstrap size")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.source, args.out, args.baseline, args.resamples)
        if args.markdown:
            command = shlex.join(["python", "-m", "mka_exp.report", *argv])
            write_comparison_doc(args.markdown, report, args.source, command)
    except (ReportError, samples_mod.SamplesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, table in report.tables.items():
        print(f"## {TITLES[name]}\n\n{markdown(table)}")
    if report.statistics:
        print(f"## Intervals and paired tests\n{report.statistics}")
    if args.wandb:
        log_to_wandb(report)
    print(f"report written to {report.out / 'report.md'}")
    return 0
