"""How many examples does KL to the dense model need to separate two methods, against accuracy?

For every pair of compressed runs of one model at one layer count that were evaluated on the same
examples of a task, both with per-choice log-likelihoods (`choice_ll` in the per-example records)
and with the model's dense run on those examples: the examples a paired test needs for 80 % power
at alpha = 0.05 to detect the observed difference, from the per-example differences of accuracy
(0/1 right) and of KL(dense || compressed) over the choices; and their ratio (accuracy's over
KL's: how many times more examples accuracy needs). Pairs whose accuracies do not differ at all
need infinitely many for accuracy (shown as inf). Runs without `choice_ll` (older records) are
skipped; the last line counts them.

    python benchmarks/distance_power.py docs/evidence/smollm2_tasks [more records dirs...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mka_exp.report import cli, distance, loading
from mka_exp.report.analysis import Boot, accuracy_rows
from mka_exp.report.loading import ReportError, column
from mka_exp.report.tables import markdown


def per_examples(sources: list[Path], tmp: Path) -> tuple[pd.DataFrame, dict, int]:
    """Each compressed run with choices against its dense run: runs, per-example frames, and
    the number of runs read."""
    root = cli.merged_outputs(sources, tmp) if len(sources) > 1 else sources[0]
    table, _ = loading.load_table(root)
    df = loading.prepare(table)
    df = df.assign(removed=column(df, "layers_before") - column(df, "layers_after"))
    frames, _ = loading.read_all_samples(df, loading.load_records(root), root)
    accuracy, _ = accuracy_rows(df, frames, Boot(resamples=100))
    runs, pers = distance.dense_distances(
        accuracy, frames, resamples=100, seed=0
    )  # intervals unused
    return runs, pers, len(frames)


def power_rows(runs: pd.DataFrame, pers: dict) -> pd.DataFrame:
    rows = []
    for _, group in runs.groupby(["model", "quantizer", "removed", "task"], sort=False):
        for (_, a), (_, b) in itertools.combinations(group.iterrows(), 2):
            per_a, per_b = pers[(a["config_hash"], a["task"])], pers[(b["config_hash"], b["task"])]
            try:
                got = distance.power(per_a, per_b)
            except ValueError:  # evaluated on other examples: no paired test
                continue
            rows.append({"model": a["model"], "removed": int(a["removed"]), "task": a["task"],
                         "A": loading.run_label(a), "B": loading.run_label(b)} | got)  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", type=Path, nargs="+", help="outputs/evidence dirs with records/")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs, pers, read = per_examples(args.sources, Path(tmp))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = power_rows(runs, pers) if not runs.empty else pd.DataFrame()
    if table.empty:
        print(f"no pair of runs with per-choice log-likelihoods (choice_ll) on the same examples "
              f"among {read} runs with per-example records")  # fmt: skip
        return 0
    print(markdown(table.assign(acc_difference=(100 * table["acc_difference"]).round(1),
                                kl_difference=table["kl_difference"].round(4),
                                ratio=table["ratio"].round(1))))  # fmt: skip
    finite = table["ratio"].replace([np.inf, -np.inf], np.nan).dropna()
    print(f"\n{len(table)} pairs; median ratio {finite.median():.1f} (accuracy's examples over "
          f"KL's, {len(finite)} pairs where both are finite); {read - runs['config_hash'].nunique()}"
          " runs without choice_ll or a dense run to pair with were skipped")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
