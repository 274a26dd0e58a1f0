"""The best pruning, chosen beforehand: per model × cut, the pruning run most accurate on a
selection task (MMLU's validation questions, `mmlu_val`), written into a declaration's `chosen:`
block before the test runs (issue 28).

    python -m mka_exp.report select-best outputs/qwen15b_declared_select --task mmlu_val \
        --into conf/compare/qwen15b_declared.yaml

Why beforehand: the most accurate of several runs on the very questions it is then compared on
is favoured by their luck (the report's cross-fitted `best_pruning` removes that by splitting the
test questions; this removes it by never looking at them). Candidates: every unquantized,
unrepaired run of the registry's pruning family that evaluated the task, scored by its accuracy
there from its per-example rows (a macro average over subtasks, with a bootstrap interval, when
there are several: MMLU's subjects; else a Wilson interval). Ties go to the registry's display
order. The declaration's `chosen:` block (below its marker line) is rewritten; a choice already
there for the same model and cut is never replaced by a different one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from mka_exp.methods import registry
from mka_exp.report import stats
from mka_exp.report.declared import MARKER, chosen_entry
from mka_exp.report.loading import ReportError, load_records, repair_name
from mka_exp.results import samples as samples_mod


@dataclass(frozen=True)
class Candidate:
    """One pruning run on the selection task: its accuracy there with the interval."""

    model: str
    removed: int
    method: str
    options: dict
    accuracy: stats.Interval
    config_hash: str

    def text(self) -> str:
        a = self.accuracy
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        name = f"{self.method} ({options})" if options else self.method
        return f"{name}: {a.value:.4f} [{a.low:.4f}, {a.high:.4f}] (n={a.n}, record {self.config_hash[:12]})"


def candidates(root: Path, task: str, metric: str) -> list[Candidate]:
    """Every eligible run's score on `task` (see the module docstring)."""
    found = []
    for key, record in sorted(load_records(root).items()):
        config = record.get("config") or {}
        if not eligible(record, config):
            continue
        rows = samples_mod.read_samples(root, record)
        rows = None if rows is None else rows[(rows["task"] == task) & (rows["filter"] == "none")]
        if rows is None or rows.empty:
            continue
        info = registry.METHODS[record["method"]]
        options = {k: config["method"][k] for k in info.variant_keys if k in config["method"]}
        removed = int(record["layers_before"]) - int(record["layers_after"])
        found.append(Candidate(str(record["model"]), removed, record["method"], options,
                               score(rows, metric), key))  # fmt: skip
    return found


def eligible(record: dict, config: dict) -> bool:
    method = record.get("method")
    return (
        method in registry.of_family("pruning")
        and str(record.get("quantizer", "none")) == "none"
        and repair_name((config.get("repair") or {}).get("_target_")) in (None, "none")
    )


def score(rows: pd.DataFrame, metric: str) -> stats.Interval:
    """Accuracy with its 95 % interval: the macro average over subtasks when there are several."""
    y = rows[metric].to_numpy()
    if rows["subtask"].nunique() > 1:
        return stats.macro_interval(y, rows["subtask"].to_numpy())
    return stats.wilson(y)


def choose(found: list[Candidate]) -> dict[tuple[str, int], list[Candidate]]:
    """Per model × cut, the candidates best first (ties: the registry's display order)."""
    cells: dict[tuple[str, int], list[Candidate]] = {}
    for candidate in found:
        cells.setdefault((candidate.model, candidate.removed), []).append(candidate)
    rank = {name: i for i, name in enumerate(registry.METHODS)}
    return {
        cell: sorted(runs, key=lambda c: (-c.accuracy.value, rank[c.method]))
        for cell, runs in sorted(cells.items())
    }


def entry(ranked: list[Candidate], task: str, metric: str) -> dict:
    """The `chosen:` entry of one cell: the side (method and options) and how it was chosen."""
    best = ranked[0]
    runner = f"; runner-up {ranked[1].text()}" if len(ranked) > 1 else "; no runner-up"
    note = f"{task} {metric}, highest of {len(ranked)}: {best.text()}{runner}"
    return {"method": best.method, **best.options, "selected_on": note}


def merged_choices(existing: dict, new: dict, where: str) -> dict:
    """`existing` plus `new` (model -> cut -> entry); a different choice for a cell already
    chosen is refused, the same one kept as it was."""
    merged = {model: dict(cuts) for model, cuts in (existing or {}).items()}
    for model, cuts in new.items():
        for cut, choice in cuts.items():
            old = merged.setdefault(model, {}).get(cut)
            if old is not None and chosen_entry(old, where) != chosen_entry(choice, where):
                raise ReportError(
                    f"{where}: chosen.{model}.{cut} is already {old['method']} "
                    f"({old.get('selected_on', 'no note')}); refusing to overwrite it with "
                    f"{choice['method']} (remove that entry by hand to choose again)"
                )
            if old is None:
                merged[model][cut] = choice
    return merged


def write_choices(path: Path, new: dict) -> dict:
    """Rewrite the declaration's `chosen:` block (everything after its marker line) with the
    old choices plus the new; the text above the marker is kept as it is."""
    text = path.read_text() if path.is_file() else ""
    head, marker, _ = text.partition(MARKER)
    if not marker:
        raise ReportError(f"{path}: no line starting with {MARKER!r} (where the choices go)")
    existing = (yaml.safe_load(text) or {}).get("chosen") or {}
    merged = merged_choices(existing, new, str(path))
    tail = text[len(head) + len(marker) :].split("\n", 1)[0]  # the rest of the marker line
    block = yaml.safe_dump({"chosen": merged}, sort_keys=False, width=200)
    path.write_text(f"{head}{marker}{tail}\n{block}")
    return merged


# Declared with the repair's experiment (before any choice): SLEB's search on the repair's 200 k
# calibration tokens would take days a step on a CPU, so a chosen SLEB searches on evenly spaced
# passages holding 1,000 tokens, as its phase-1 and test runs on the default calibration do
# (conf/experiment/qwen15b_declared_select.yaml), in the repaired run and its twin alike (they
# cut the same layers); the record says so.
SLEB_SEARCH_TOKENS = 1000


def commands(chosen: dict) -> list[str]:
    """The test phase's runs of the chosen methods (conf/experiment/qwen15b_declared_*.yaml)."""
    lines = []
    for cuts in chosen.values():
        for cut, choice in cuts.items():
            options = " ".join(f"method.{k}={v}" for k, v in choice.items()
                               if k not in ("method", "selected_on"))  # fmt: skip
            if choice["method"] == "sleb":
                options += f" method.search_tokens={SLEB_SEARCH_TOKENS}"
            for experiment in ("qwen15b_declared_repair", "qwen15b_declared_twin"):
                lines.append(f"python run.py -m experiment={experiment} method={choice['method']} "
                             f"method.num_layers={cut} {options} $O".replace("  ", " "))  # fmt: skip
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mka_exp.report select-best",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("source", type=Path, help="the selection phase's outputs dir (records/)")
    parser.add_argument("--task", default="mmlu_val", help="the selection task (default mmlu_val)")
    parser.add_argument("--metric", default="acc", choices=samples_mod.METRICS)
    parser.add_argument("--into", type=Path, default=None, metavar="YAML",
                        help="the declaration whose `chosen:` block gets the choices")  # fmt: skip
    args = parser.parse_args(argv)
    found = candidates(args.source, args.task, args.metric)
    if not found:
        raise ReportError(f"{args.source}: no unquantized, unrepaired pruning run with "
                          f"per-example rows of task {args.task!r}")  # fmt: skip
    chosen: dict = {}
    for (model, cut), ranked in choose(found).items():
        print(f"{model}, {cut} layers removed, on {args.task} ({args.metric}):")
        for i, candidate in enumerate(ranked):
            print(f"  {'chosen    ' if i == 0 else 'runner-up ' if i == 1 else '          '}"
                  f"{candidate.text()}")  # fmt: skip
        chosen.setdefault(model, {})[cut] = entry(ranked, args.task, args.metric)
    if args.into:
        chosen = write_choices(args.into, chosen)
        print(f"written to {args.into} (chosen:); the test phase's runs of the chosen methods:")
        print("\n".join(commands(chosen)))
    return 0
