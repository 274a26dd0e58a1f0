"""Declared comparisons: which differences are confirmatory, and Holm's correction within a family.

A declaration names, before the runs (or, for evidence already seen, retrospectively, and the
report says which), the comparisons it stands behind. It lives in the run config (`+compare=NAME`,
`conf/compare/`, kept out of the config hash) or beside the records as `<outputs dir>/compare.yaml`:

    declared: before the runs   # or: retrospective (the data had been seen)
    metrics: [acc]              # the task metrics compared (MMLU: its macro average)
    alpha: 0.05                 # family-wise error rate per family
    repair_twins: true          # each repaired run against the same run without repair
    primary:                    # run A minus run B; B may be best_pruning (cross-fitted)
      - a: {method: mka, pairing: adjacent_back, lam: code, scope: linear}
        b: {method: reverse_prune, keep_final: false}
      - a: {method: mka, calib: mmlu_prompts}   # calib: the calibration source's builder
        b: chosen_pruning       # per model and cut, the method in `chosen` (chosen beforehand)
    chosen:                     # written by `select-best` (selection.py) below the MARKER line
      qwen25_coder_15b:
        4: {method: shortgpt, representation: tokens, selected_on: "mmlu_val acc ..."}

A side matches the runs of its method whose options (the registry's variant keys) have the given
values (and, with `calib`, whose calibration source is that `mka_exp.calibration` builder); B is
taken with A's repair, and with A's calibration source where that singles out one run. A family is
one model × quantizer × layer count: every declared comparison there, over every task, is one Holm
family. Only these comparisons carry marks. Several outputs dirs may carry different declarations
(older evidence declared retrospectively beside a grid declared before its runs): each governs its
own records (both sides of its comparisons and its families, at its own alpha); one record under
two different declarations is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mka_exp.choices import did_you_mean
from mka_exp.methods import registry
from mka_exp.report import stats
from mka_exp.report.loading import GROUP, ReportError, align, note, repair_name, run_label

BEST = "best_pruning"
CHOSEN = "chosen_pruning"
CALIB = "calib"  # a side's option naming the calibration builder (`config.calib._target_`)
WHEN = ("before the runs", "retrospective")
KEYS = ("declared", "metrics", "alpha", "repair_twins", "primary", "chosen")
MARKER = "# --- chosen_pruning"  # the line after which `select-best` writes `chosen:`
FAMILY = ["model", "quantizer", "removed"]
FILE = "compare.yaml"


@dataclass(frozen=True)
class Side:
    method: str
    options: tuple[tuple[str, str], ...] = ()

    def label(self) -> str:
        if self.method == BEST:
            return "best pruning (cross-fitted)"
        if self.method == CHOSEN:
            return "pruning chosen beforehand"
        options = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.method} ({options})" if options else self.method


@dataclass(frozen=True)
class Declaration:
    when: str
    metrics: tuple[str, ...]
    alpha: float
    repair_twins: bool
    primary: tuple[tuple[Side, Side], ...]
    source: str = ""
    chosen: tuple[tuple[tuple[str, int], Side], ...] = ()  # (model, layers removed) -> side
    covers: frozenset[str] = frozenset()  # the config hashes of the records it governs

    def same_as(self, other: Declaration) -> bool:
        mine = {**self.__dict__, "source": "", "covers": None}
        return mine == {**other.__dict__, "source": "", "covers": None}


def bad(source: str, key: str, value: object, allowed: str) -> ReportError:
    return ReportError(f"{source}: {key}={value!r} is not allowed; {allowed}")


def parse(obj: object, source: str) -> Declaration:
    """A declaration from its YAML/config mapping; one clear error per bad key or value."""
    if not isinstance(obj, dict):
        raise bad(source, "compare", obj, "expected a mapping with keys " + ", ".join(KEYS))
    for key in obj:
        if key not in KEYS:
            raise bad(source, key, obj[key], f"keys: {', '.join(KEYS)}{did_you_mean(key, KEYS)}")
    when = obj.get("declared")
    if when not in WHEN:
        raise bad(source, "declared", when, f"one of: {', '.join(WHEN)}")
    metrics = tuple(obj.get("metrics") or ("acc",))
    if not set(metrics) <= {"acc", "acc_norm"}:
        raise bad(source, "metrics", list(metrics), "a list of acc, acc_norm")
    alpha = obj.get("alpha", stats.ALPHA)
    if not isinstance(alpha, float | int) or not 0 < alpha < 1:
        raise bad(source, "alpha", alpha, "a number in (0, 1)")
    pairs = tuple(
        (
            side(p.get("a"), f"{source}: primary[{i}].a"),
            side(p.get("b"), f"{source}: primary[{i}].b"),
        )
        for i, p in enumerate(obj.get("primary") or [])
    )
    chosen = parse_chosen(obj.get("chosen") or {}, f"{source}: chosen")
    return Declaration(
        when, metrics, float(alpha), bool(obj.get("repair_twins", False)), pairs, source, chosen
    )


def parse_chosen(obj: object, where: str) -> tuple[tuple[tuple[str, int], Side], ...]:
    """`{model: {layers removed: {method: NAME, option: value, selected_on: note}}}`."""
    if not isinstance(obj, dict):
        raise bad(where, "chosen", obj, "{model: {layers removed: {method: NAME, ...}}}")
    out = []
    for model, cuts in obj.items():
        for cut, choice in (cuts or {}).items() if isinstance(cuts, dict) else [(None, cuts)]:
            # a record's copy went through JSON, whose keys are strings: "4" is the layer count 4
            count = int(cut) if isinstance(cut, str) and cut.isdigit() else cut
            if not isinstance(count, int) or isinstance(count, bool):
                raise bad(where, f"chosen.{model}", cut, "a layer count (an integer) per model")
            out.append(((str(model), count), chosen_entry(choice, f"{where}.{model}.{count}")))
    return tuple(sorted(out, key=lambda item: item[0]))


def chosen_entry(choice: object, where: str) -> Side:
    """One chosen side; `selected_on` (how it was chosen) is a note, not an option."""
    if isinstance(choice, dict):
        choice = {k: v for k, v in choice.items() if k != "selected_on"}
    picked = side(choice, where)
    if picked.method in (BEST, CHOSEN):
        raise bad(where, "method", picked.method, "a method of the registry")
    return picked


def side(obj: object, where: str) -> Side:
    """`best_pruning`, `chosen_pruning` or `{method: NAME, <variant key>: value, ...}` (and
    `calib: <builder>`)."""
    if obj in (BEST, CHOSEN):
        return Side(str(obj))
    if not isinstance(obj, dict) or "method" not in obj:
        raise ReportError(
            f"{where}: {obj!r} is not allowed; {BEST} or {{method: NAME, option: value}}"
        )
    method = obj["method"]
    if method not in registry.METHODS:
        hint = did_you_mean(str(method), list(registry.METHODS))
        raise ReportError(f"{where}: method={method!r} is not a method{hint}")
    keys = registry.METHODS[method].variant_keys
    for key in obj:
        if key not in ("method", CALIB) and key not in keys:
            allowed = ", ".join(keys) or "none"
            raise ReportError(f"{where}: option {key!r} does not label a {method} variant "
                              f"(its variant keys: {allowed}){did_you_mean(key, keys)}")  # fmt: skip
    options = tuple(sorted((k, option_text(v)) for k, v in obj.items() if k != "method"))
    return Side(method, options)


def option_text(value: object) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def load_declarations(sources: list[Path], records: dict[str, dict]) -> list[Declaration]:
    """The declarations of these outputs dirs (their compare.yaml: the dir's records) and records
    (`compare` in the config: that record), equal ones merged; an error when one record falls
    under two that differ."""
    found = []
    for source in sources:
        path = Path(source) / FILE
        if path.is_file():
            # its records are already read (`records`): name them by file, no second parse
            covers = frozenset(p.stem for p in (Path(source) / "records").glob("*.json")) & set(
                records
            )
            found.append(replace(parse(yaml.safe_load(path.read_text()), str(path)), covers=covers))
    for key, record in sorted(records.items()):
        block = (record.get("config") or {}).get("compare")
        if block:
            found.append(replace(parse(block, record_source(key)), covers={key}))
    merged: list[Declaration] = []
    for decl in found:
        same = next((i for i, m in enumerate(merged) if m.same_as(decl)), None)
        if same is None:
            merged.append(decl)
        else:
            kept = merged[same]
            sources = ", ".join(dict.fromkeys([*kept.source.split(", "), decl.source]))
            merged[same] = replace(kept, source=sources, covers=kept.covers | decl.covers)
    refuse_overlaps(merged)
    return merged


def record_source(key: str) -> str:
    """The source name of a declaration carried in record `key`'s config."""
    return f"record {key} (config.compare)"


def carried_record(source: str) -> str | None:
    """The record key of a `record_source` name; None for a file."""
    found = re.fullmatch(r"record (\S+) \(config\.compare\)", source)
    return found[1] if found else None


def refuse_overlaps(decls: list[Declaration]) -> None:
    for i, one in enumerate(decls):
        for other in decls[i + 1 :]:
            both = sorted(one.covers & other.covers)
            if both:
                raise ReportError(f"record {both[0]}: {one.source} and {other.source} declare "
                                  "different comparisons for it; keep one")  # fmt: skip


def matches(config: dict, wanted: Side) -> bool:
    method = config.get("method") or {}
    return all(option_text(method.get(k) if k != CALIB else calib_of(config)) == v
               for k, v in wanted.options)  # fmt: skip


def calib_of(config: dict) -> str:
    """The calibration builder's name: `mka_exp.calibration.mmlu_prompts` -> `mmlu_prompts`."""
    return str((config.get("calib") or {}).get("_target_", "")).rsplit(".", 1)[-1]


def repair_of(record: dict) -> object:
    return repair_name(((record.get("config") or {}).get("repair") or {}).get("_target_"))


Pair = Callable[[pd.DataFrame, str], dict]


def primary_comparisons(
    decls: list[Declaration],
    accuracy: pd.DataFrame,
    sets: dict,
    composites: dict,
    repair: pd.DataFrame,
    records: dict[str, dict],
    pair: Pair,
) -> tuple[pd.DataFrame, list[dict]]:
    """Every declared comparison, with Holm's adjusted p within its family and the mark; each
    declaration on its own records (column `declaration`: its source)."""
    frames, notes = [], []
    for decl in decls:
        mine = accuracy[accuracy["config_hash"].isin(decl.covers)]
        twins = repair[repair["config_hash"].isin(decl.covers)] if not repair.empty else repair
        rows, more = declared_rows(decl, mine, sets, composites, twins, records, pair)
        frame = holm_within_families(pd.DataFrame(rows), decl.alpha)
        frames += [] if frame.empty else [frame.assign(declaration=decl.source)]
        notes += more
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def declared_rows(decl, accuracy, sets, composites, repair, records, pair) -> tuple[list, list]:
    """One declaration's comparisons (before Holm) and the notes on those it could not make."""
    rows, notes = [], []
    wanted = accuracy[accuracy["removed"] > 0]
    wanted = wanted[wanted["metric"].str.removesuffix("_macro").isin(decl.metrics)]
    for a_side, b_side in decl.primary:
        for _, run in wanted[wanted["method"] == a_side.method].iterrows():
            record = records.get(run["config_hash"], {})
            if not matches(record.get("config") or {}, a_side):
                continue
            b_run, problem = chosen_side(decl, run, b_side)
            if not problem:
                got, problem = against(run, b_run, wanted, sets, composites, records, pair)
            if problem:
                notes.append(note(run, f"declared {a_side.label()} − {b_side.label()}: {problem}"))
            elif got:
                b_name = b_side.label() if b_side.method == BEST else got.pop("b")
                b_name = f"{b_name} (chosen beforehand)" if b_side.method == CHOSEN else b_name
                name = f"{run_label(run)} − {b_name}"
                rows = add_pair(rows, identity(run) | {"comparison": name, "kind": "pair"} | got)
    if decl.repair_twins and not repair.empty:
        twins = repair[repair["metric"].str.removesuffix("_macro").isin(decl.metrics)]
        for _, row in twins.iterrows():
            fields = {k: row[k] for k in ("difference", "low", "high", "p_value", "a_only",
                                           "b_only", "n", "mde", "excludes_zero")}  # fmt: skip
            name = f"{run_label(row)} − same without repair"
            rows.append(identity(row) | {"comparison": name, "kind": "repair",
                                         "baseline_hash": row["baseline_hash"]} | fields)  # fmt: skip
    return rows, notes


def add_pair(rows: list[dict], row: dict) -> list[dict]:
    """`rows` with `row`, unless two declared comparisons name the same pair of runs (the chosen
    pruning is the other declared B): then it is one hypothesis, counted once by Holm."""
    key = ("config_hash", "baseline_hash", "column", "metric")
    for seen in rows:
        if all(seen[k] == row[k] for k in key):
            b_name = row["comparison"].rsplit(" − ", 1)[-1]
            chosen = b_name.endswith("(chosen beforehand)")
            seen["comparison"] += f" (also {'the pruning chosen beforehand' if chosen else b_name})"
            return rows
    return [*rows, row]


def chosen_side(decl: Declaration, run: pd.Series, b_side: Side) -> tuple[Side, str]:
    """Side B for `run`: as declared, or for `chosen_pruning` the method chosen for its model
    and cut; or why there is none."""
    if b_side.method != CHOSEN:
        return b_side, ""
    cell = (str(run["model"]), int(run["removed"]))
    for key, picked in decl.chosen:
        if key == cell:
            return picked, ""
    return b_side, (f"no pruning method chosen for {cell[0]} at {cell[1]} layers removed "
                    "(`python -m mka_exp.report select-best` writes `chosen:`)")  # fmt: skip


def identity(run: pd.Series) -> dict:
    keys = ("config_hash", "model", "quantizer", "method", "variant", "removed", "column", "metric")
    return {k: run[k] for k in keys}


def against(run, b_side, wanted, sets, composites, records, pair) -> tuple[dict, str]:
    """The paired cells of `run` minus side B in `run`'s column; or what went wrong."""
    if b_side.method == BEST:
        composite = composites.get(tuple(run[GROUP]))
        if composite is None:
            return {}, ""
        b_outcomes, b_hash, b_label = composite.outcomes, "+".join(composite.hashes), ""
    else:
        pool = same_repair(run, b_side, wanted, records)
        if len(pool) != 1:
            many = f"{len(pool)} runs match side B in {run['column']}; declare it narrower"
            return {}, many if pool else ""
        b_hash, b_label = pool[0]["config_hash"], run_label(pool[0])
        b_outcomes = sets[(b_hash, run["column"])]
    aligned, problem = align(sets[(run["config_hash"], run["column"])], b_outcomes)
    if problem:
        return {}, f"{run['column']} evaluated on different examples ({problem})"
    return {"b": b_label, "baseline_hash": b_hash} | pair(aligned, run["metric"]), ""


def same_repair(run: pd.Series, b_side: Side, wanted: pd.DataFrame, records: dict) -> list:
    """The runs of side B in `run`'s column and cut with `run`'s repair; of several, those with
    `run`'s calibration source when that leaves one (a twin run on other calibration)."""
    here = wanted[(wanted[GROUP] == run[GROUP]).all(axis=1) & (wanted["method"] == b_side.method)]
    mine = records.get(run["config_hash"], {})
    pool = [r for _, r in here.iterrows()
            if matches(records.get(r["config_hash"], {}).get("config") or {}, b_side)
            and repair_of(records.get(r["config_hash"], {})) == repair_of(mine)]  # fmt: skip
    calib = calib_of(mine.get("config") or {})
    same = [
        r for r in pool if calib_of(records.get(r["config_hash"], {}).get("config") or {}) == calib
    ]
    return same if len(pool) > 1 and len(same) == 1 else pool


def holm_within_families(frame: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Holm's adjusted p per family (model × quantizer × layer count) and the mark."""
    if frame.empty:
        return frame
    frame = frame.reset_index(drop=True)
    frame["family_size"] = frame.groupby(FAMILY)["p_value"].transform("size")
    frame["p_holm"] = np.nan
    for _, index in frame.groupby(FAMILY).groups.items():
        frame.loc[index, "p_holm"] = stats.holm(frame.loc[index, "p_value"].to_numpy())
    frame["significant"] = frame["p_holm"] < alpha
    return frame
