"""`python -m mka_exp.report`: tables put the paper's numbers beside ours, plots and heatmaps
render, bad input fails with one line naming the path."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mka_exp.report import (
    analysis,
    cli,
    declared,
    document,
    figures,
    loading,
    sections,
    selection,
    sensitivity,
    stats,
    tables,
)
from mka_exp.results import records as results
from mka_exp.results import samples
from mka_exp.results import table as results_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(
    model: str,
    method: str,
    before: int,
    after: int,
    metrics: dict[str, float],
    quantizer: str = "none",
    bits: int = 16,
    **method_cfg: object,
) -> dict:
    """A hand-made run record shaped like the pipeline's (only the fields the report reads)."""
    config = {
        "model": {"name": model},
        "method": {"_target_": f"mka_exp.methods.{method}.X", "ratio": 1 - after / before},
        "quant": {"name": quantizer},
        "paths": {"output_root": "/somewhere"},
    }
    config["method"].update(method_cfg)
    stats = {"removed_layers": list(range(after, before))}
    if method == "sparsegpt":
        stats = {"target_sparsity": method_cfg["sparsity"]}
    return {
        "model": model,
        "method": method,
        "quantizer": quantizer,
        "layers_before": before,
        "layers_after": after,
        "layer_ratio": 1 - after / before,
        "paper_compression_ratio": (before - after / (16 / bits)) / before,
        "weight_bits": bits,
        "zero_fraction": 0.0,
        "metrics": metrics,
        "method_stats": stats,
        "quant_stats": {"bits": bits},
        "timings": {"evaluate": 1.0},
        "config": config,
        "config_hash": results.config_hash(config),
    }


def five(mmlu: float, piqa: float, hellaswag: float, race: float, boolq: float) -> dict:
    return {
        "mmlu/acc_macro": mmlu,
        "mmlu/acc": mmlu - 0.01,  # the group score must lose to the macro average
        "piqa/acc": piqa,
        "piqa/acc_norm": piqa + 0.01,
        "hellaswag/acc": hellaswag,
        "race/acc": race,
        "boolq/acc": boolq,
    }


RECORDS = [
    make_record("llama3_8b", "none", 32, 32, five(0.65, 0.80, 0.70, 0.60, 0.70)),
    make_record("llama3_8b", "shortgpt", 32, 18, five(0.30, 0.58, 0.35, 0.22, 0.60)),
    make_record("llama3_8b", "mka", 32, 18, five(0.60, 0.55, 0.50, 0.40, 0.62), lam="code"),
    make_record("llama3_8b", "mka", 32, 18, {"mmlu/acc_macro": 0.58}, lam="paper"),
    make_record("llama3_8b", "reverse_prune", 32, 28, {"mmlu/acc": 0.655}),
    make_record("llama3_8b", "sparsegpt", 32, 32, five(0.45, 0.6, 0.3, 0.3, 0.5), sparsity=0.34375),
    make_record("llama3_8b", "mka", 32, 18, {"mmlu/acc_macro": 0.61}, "gptq", 4, lam="code"),
    make_record("llama3_8b", "mka", 32, 18, {"mmlu/acc_macro": 0.62}, "smoothquant", 8),
    make_record("smollm2_135m", "reverse_prune", 30, 27, {"piqa/acc": 0.6, "mmlu/acc": 0.3}),
    make_record("smollm2_135m", "reverse_prune", 30, 24, {"piqa/acc": 0.55, "mmlu/acc": 0.27}),
]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """An outputs dir: records + results.csv, and two run dirs with similarity matrices."""
    root = tmp_path_factory.mktemp("outputs")
    for record in RECORDS:
        results_table.save_record(root, record)
    for run_dir, name in (("runs/2025-01-01/12-00-00", "before"), ("multirun/d/t/3", "after")):
        (root / run_dir).mkdir(parents=True)
        np.save(root / run_dir / f"similarity_{name}.npy", np.eye(6) + 0.1)
        (root / run_dir / "results.json").write_text(json.dumps(RECORDS[2]))
    return root


@pytest.fixture(scope="module")
def built(outputs: Path) -> tuple[Path, str]:
    """The report of `outputs` (default --out) and what it printed."""
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main([str(outputs)]) == 0
    return outputs / "report", stdout.getvalue()


def row(table: pd.DataFrame, **match: object) -> pd.Series:
    hits = table
    for key, value in match.items():
        hits = hits[hits[key].fillna("") == value]
    assert len(hits) == 1, f"{match}: {len(hits)} rows\n{table}"
    return hits.iloc[0]


def test_paper_file_ships_and_maps_names():
    paper = tables.load_paper()
    assert len(paper) == 182
    assert set(paper["model"]) == {"llama3_8b", "mistral_7b", "llama2_7b", "llama2_13b"}
    assert set(paper["task"]) == set(loading.TASKS)
    assert set(paper["method"]) <= set(tables.PAPER_METHODS)


def test_table_3_4_puts_paper_mmlu_beside_ours(built):
    out, _ = built
    table = pd.read_csv(out / "table3_4.csv")
    mka = row(table, model="llama3_8b", method="mka", variant="lam=code")
    assert (mka["layers_after"], mka["compression_ratio"]) == (18, 0.4375)
    assert mka["mmlu"] == 60.0 and mka["mmlu_paper"] == 64.42  # paper Table 3, 18 layers
    assert row(table, method="mka", variant="lam=paper")["mmlu"] == 58.0
    pruned = row(table, model="llama3_8b", method="reverse_prune")
    assert pruned["mmlu"] == 65.5 and pruned["mmlu_paper"] == 66.21  # group score as fallback
    assert row(table, model="llama3_8b", method="none")["mmlu_paper"] == 66.29
    small = row(table, model="smollm2_135m", layers_after=27)
    assert small["mmlu"] == 30.0 and np.isnan(small["mmlu_paper"])


def test_table_2_has_five_tasks_with_paper(built):
    out, _ = built
    table = pd.read_csv(out / "table2.csv")
    short = row(table, model="llama3_8b", method="shortgpt")
    assert short["piqa"] == 58.0 and short["piqa_paper"] == 59.03
    assert short["race"] == 22.0 and short["race_paper"] == 21.58  # the paper's race_h
    assert short["boolq_paper"] == 61.53 and short["mmlu_paper"] == 26.09
    sparse = row(table, method="sparsegpt")
    assert sparse["compression_ratio"] == 0.34375 and sparse["mmlu_paper"] == 44.45
    vanilla = row(table, model="llama3_8b", method="none")
    assert vanilla["hellaswag"] == 70.0 and vanilla["hellaswag_paper"] == 74.54
    assert np.isnan(row(table, method="mka", variant="lam=code")["piqa_paper"])


def test_table_1_matches_quantized_runs_by_retained_layers(built):
    out, _ = built
    table = pd.read_csv(out / "table1.csv")
    assert set(table["quantizer"]) == {"none", "gptq", "smoothquant"}
    gptq = row(table, quantizer="gptq")
    assert gptq["mmlu"] == 61.0 and gptq["mmlu_paper"] == 62.98
    assert gptq["compression_ratio"] == pytest.approx(0.85938, abs=1e-5)
    smooth = row(table, quantizer="smoothquant")  # W8: ours 0.71875, the paper counted int4
    assert smooth["compression_ratio"] == 0.71875 and smooth["compression_ratio_paper"] == 0.85938
    assert smooth["mmlu_paper"] == 64.2


def test_markdown_printed_and_indexed(built):
    out, printed = built
    for name in ("table1", "table2", "table3_4"):
        assert (out / f"{name}.md").read_text().count("\n") > 3
    assert "| llama3_8b | mka | lam=code | 32 | 18 | 0.4375 | 60.00 | 64.42 |" in printed
    index = (out / "report.md").read_text()
    assert "table2.csv" in index and "plots/curve_llama3_8b.png" in index
    assert "heatmaps/" in index


def test_plots_and_heatmaps_are_pngs(built):
    out, _ = built
    curves = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert curves == ["curve_llama3_8b.png", "curve_smollm2_135m.png"]  # one figure per model
    maps = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert maps == [
        "multirun_d_t_3_similarity_after.png",
        "runs_2025-01-01_12-00-00_similarity_before.png",
    ]
    for path in [*(out / "plots").glob("*.png"), *(out / "heatmaps").glob("*.png")]:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_csv_input_and_wandb_failure_only_warns(outputs, tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no wandb service here")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(RuntimeWarning, match="no wandb service here"):
        assert cli.main([str(outputs / "results.csv"), "--out", str(tmp_path), "--wandb"]) == 0
    assert (tmp_path / "report.md").exists()
    table = pd.read_csv(tmp_path / "table3_4.csv")
    mka = table[(table["method"] == "mka") & (table["mmlu"] == 60.0)].iloc[0]
    assert mka["variant"].startswith("#") and mka["mmlu_paper"] == 64.42  # hash tells runs apart


def test_wandb_disabled_mode_logs_without_error(built, monkeypatch, recwarn):
    out, _ = built
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in ("table1", "table2", "table3_4")}
    plots = sorted((out / "plots").glob("*.png"))[:2]
    cli.log_to_wandb(cli.Report(out=out, tables=tables, plots=plots))
    assert not [w for w in recwarn if "wandb logging failed" in str(w.message)]


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "empty_csv"])
def test_bad_input_is_one_line_naming_the_path(kind, tmp_path, capsys):
    path = tmp_path / "nothing"
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "empty_csv":
        path = tmp_path / "results.csv"
        path.write_text("")
    assert cli.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err


# ---------------------------------------------------------------- statistics from a tiny sweep

SWEEP_EVAL = ["eval.tasks=[piqa,boolq]", "eval.limit=24"]


def planted(root: Path, record: dict, name: str, rows: pd.DataFrame, **config: object) -> dict:
    """A copy of `record` as another run (its config changed) with the given per-example rows."""
    copy = json.loads(json.dumps(record))
    copy["config"]["method"].update(config)
    copy["config_hash"] = results.config_hash(copy["config"])
    copy["method"] = name
    copy["samples"] = samples.write_samples(root, copy["config_hash"], rows)
    copy["metrics"] = samples.aggregate(rows)
    results_table.save_record(root, copy)
    return copy


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root) -> tuple[Path, dict]:
    """Tiny-model runs with per-example records: dense, reverse_prune and shortgpt curves at 1
    and 2 of 4 layers, MKA at 1; plus a planted run that answers every example right (a sure
    win), one scored on fewer examples (no paired test possible) and three calibration seeds."""
    from mka_exp import pipeline
    from tests.helpers import compose_config

    root = tmp_path_factory.mktemp("sweep")
    runs = {}
    for method, extra in (
        ("none", []),
        ("reverse_prune", ["curve=[0.25,0.5]"]),
        ("shortgpt", ["curve=[0.25,0.5]"]),
        ("mka", ["method.ratio=0.25"]),
    ):
        cfg = compose_config([f"method={method}", *extra, *SWEEP_EVAL], root / method, data_root)
        cfg.paths.records_dir = str(root)
        runs[method] = pipeline.run(cfg)
    short = next(
        json.loads(p.read_text())
        for p in (root / "records").glob("*.json")
        if '"method": "shortgpt"' in p.read_text() and '"layers_after": 3' in p.read_text()
    )
    rows = samples.read_samples(root, short)
    right = rows.assign(acc=1.0, acc_norm=rows["acc_norm"].where(rows["acc_norm"].isna(), 1.0))
    runs["perfect"] = planted(
        root,
        short,
        "mka",
        right,
        bandwidth="perfect",
        lam="code",
        pairing="adjacent_back",
        scope="linear",
    )  # MKA defaults
    runs["fewer"] = planted(root, short, "mka", rows.iloc[3:], bandwidth="fewer")
    for seed, layers, acc in ((0, [1, 2], 1.0), (1, [1, 2], 0.0), (2, [0, 2], 1.0)):
        seeded = json.loads(json.dumps(runs["mka"]))
        seeded["config"]["calib"]["seed"] = seed
        seeded["method_stats"] = {"removed_layers": layers}
        flipped = rows.assign(acc=(rows["doc_id"] % 2 == seed % 2) * acc)
        seeded["config_hash"] = results.config_hash(seeded["config"])
        seeded["samples"] = samples.write_samples(root, seeded["config_hash"], flipped)
        seeded["metrics"] = samples.aggregate(flipped)
        results_table.save_record(root, seeded)
    return root, runs


@pytest.fixture(scope="module")
def swept(sweep, tmp_path_factory) -> tuple[Path, str, Path]:
    root, _ = sweep
    doc = tmp_path_factory.mktemp("docs") / "method_comparison.md"
    doc.write_text("# Layer methods (hand-written)\n\n| method | piqa |\n|---|---|\n| x | 0.5 |\n")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main([str(root), "--markdown", str(doc), "--resamples", "2000"]) == 0
    return root / "report", stdout.getvalue(), doc


def test_accuracy_intervals_are_wilson_on_the_records(sweep, swept):
    root, runs = sweep
    out, _, _ = swept
    acc = pd.read_csv(out / "accuracy_intervals.csv", dtype={"config_hash": str})
    dense = runs["none"]
    frame = samples.read_samples(root, dense)
    piqa = frame[frame["task"] == "piqa"]
    hit = acc[(acc["config_hash"] == dense["config_hash"]) & (acc["column"] == "piqa acc")]
    expected = stats.wilson(piqa["acc"])
    assert len(hit) == 1 and hit["n"].iloc[0] == 24
    assert hit["value"].iloc[0] == pytest.approx(dense["metrics"]["piqa/acc"], abs=1e-12)
    assert (hit["low"].iloc[0], hit["high"].iloc[0]) == pytest.approx((expected.low, expected.high))
    assert set(acc["column"]) == {"piqa acc", "piqa acc_norm", "boolq acc"}


def cross_fitted_by_hand(root: Path, column_runs: list[dict], task: str) -> np.ndarray:
    """The cross-fitted baseline's outcomes, recomputed: doc_ids in order, odd ranks (1st, 3rd,
    ...) form half A; the best run on B answers for A, the best on A for B."""
    ys = []
    for run in column_runs:
        frame = samples.read_samples(root, run)
        frame = frame[(frame["task"] == task) & (frame["filter"] == "none")].sort_values("doc_id")
        ys.append(frame["acc"].to_numpy())
    in_a = np.arange(len(ys[0])) % 2 == 0
    on_a = int(np.argmax([y[~in_a].mean() for y in ys]))
    on_b = int(np.argmax([y[in_a].mean() for y in ys]))
    return np.where(in_a, ys[on_a], ys[on_b])


def test_differences_pair_against_the_cross_fitted_best_pruning_run(sweep, swept):
    root, runs = sweep
    out, _, _ = swept
    diffs = pd.read_csv(out / "paired_differences.csv", dtype={"config_hash": str})
    perfect = diffs[(diffs["config_hash"] == runs["perfect"]["config_hash"])]
    piqa = perfect[perfect["column"] == "piqa acc"].iloc[0]
    pruned = [json.loads(p.read_text()) for p in sorted((root / "records").glob("*.json"))]
    pruned = [r for r in pruned if r["method"] in ("reverse_prune", "shortgpt")
              and r["layers_after"] == 3]  # fmt: skip
    order = {"reverse_prune": 0, "shortgpt": 1}  # the report's display order breaks ties
    pruned.sort(key=lambda r: order[r["method"]])
    baseline = cross_fitted_by_hand(root, pruned, "piqa")
    assert piqa["difference"] == pytest.approx(1 - baseline.mean(), abs=1e-12)
    assert piqa["b_only"] == 0 and piqa["a_only"] == int((baseline == 0).sum())
    assert piqa["p_value"] == pytest.approx(stats.mcnemar_exact(piqa["a_only"], 0))
    assert "chosen on" in piqa["baseline"] and piqa["mde"] > 0
    assert set(diffs["removed"]) == {1, 2}  # the dense run has no baseline


def test_without_a_declaration_nothing_is_marked_and_ties_read_not_detected(sweep, swept):
    root, runs = sweep
    out, printed, _ = swept
    text = (out / "statistics.md").read_text()
    assert "### Accuracy (%, 95 % interval)" in text and "Examples per task: piqa 24" in text
    assert "### Against best pruning (cross-fitted) at 1 of 4 layers removed (exploratory)" in text
    against = text.split("### Does merging beat pruning?")[0]
    perfect = [
        line for line in against.splitlines() if "bandwidth=perfect" in line and " p" in line
    ]
    assert len(perfect) == 1 and perfect[0].count("p<0.001 (MDE ") == 3  # every column
    assert perfect[0].count("+") == 9  # Δ, low and high positive in each
    assert "*" not in against.split("### Against")[1]  # exploratory: no marks
    assert "Declared comparisons: none" in text and "not detected (MDE " in text
    assert "### Distance to the dense model" in text  # lm-eval's choice log-likelihoods, kept
    for word in (" tie", "equal", "within the interval"):
        assert word not in text
    assert re.search(r"\| none \|  \| 0 \|  \| \d+\.\d \[\d+\.\d, \d+\.\d\]", text)
    fewer = "paired test impossible: " in text and "evaluated on different boolq examples" in text
    assert fewer and "3 of 24 examples evaluated by only one" in text
    assert "## Intervals and paired tests" in printed


def declare(root: Path, text: str) -> analysis.Stats:
    (root / "compare.yaml").write_text(text)
    try:
        table, _ = loading.load_table(root)
        decl = declared.load_declarations([root], loading.load_records(root))
        return analysis.compute_stats(loading.prepare(table), root, boot=analysis.Boot(200),
                                      declarations=decl)  # fmt: skip
    finally:
        (root / "compare.yaml").unlink()


MKA_VS_PRUNING = """declared: before the runs
repair_twins: true
primary:
  - a: {method: mka, lam: code, pairing: adjacent_back, scope: linear}
    b: best_pruning
  - a: {method: mka, lam: code}
    b: {method: reverse_prune, keep_final: false}
"""


def test_declared_comparisons_are_holm_adjusted_within_each_family(sweep):
    root, runs = sweep
    st = declare(root, MKA_VS_PRUNING)
    primary = st.primary
    assert set(primary["removed"]) == {1}  # mka ran at one layer removed only
    assert set(primary["column"]) == {"piqa acc", "boolq acc"}  # acc only, as declared
    m = len(primary)
    # mka defaults, perfect (same options) and the seeds (calib.seed differs) vs 2 baselines; fewer
    # fails to pair on boolq and is named in a note
    expected = np.minimum(1, np.sort(primary["p_value"]) * (m - np.arange(m)))
    assert np.sort(primary["p_holm"]) == pytest.approx(np.maximum.accumulate(expected))
    assert (primary["family_size"] == m).all()
    assert (primary["significant"] == (primary["p_holm"] < 0.05)).all()
    perfect = primary[primary["config_hash"] == runs["perfect"]["config_hash"]]
    assert len(perfect) == 4 and perfect["significant"].any()
    vs_reverse = perfect[perfect["comparison"].str.contains("reverse_prune")]
    assert len(vs_reverse) == 2 and (vs_reverse["b_only"] == 0).all()


RETRO = MKA_VS_PRUNING.replace("before the runs", "retrospective")
BEFORE = """declared: before the runs
alpha: 0.01
primary:
  - a: {method: mka, lam: code, pairing: adjacent_back, scope: linear}
    b: {method: reverse_prune, keep_final: false}
"""


def test_each_declaration_governs_its_own_records_and_holm_families(sweep, tmp_path):
    """Older evidence declared retrospectively beside a grid declared before its runs (issue 28's
    test phase): each compare.yaml governs its own dir's records, side B comes from the same
    dir, Holm runs within each declaration's families at its own alpha, and the method paragraph
    says which declaration is which. One record under two different declarations is refused."""
    root, runs = sweep
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(root / "records", old / "records")
    (old / "compare.yaml").write_text(RETRO)
    (new / "records").mkdir(parents=True)
    (new / "compare.yaml").write_text(BEFORE)
    rp = next(r for r in loading.load_records(root).values()
              if r["method"] == "reverse_prune" and r["layers_after"] == 3)  # fmt: skip
    rp_new = planted(new, rp, "reverse_prune", samples.read_samples(root, rp), grid="new")
    perfect = runs["perfect"]
    mka_new = planted(new, perfect, "mka", samples.read_samples(root, perfect), grid="new")
    with contextlib.redirect_stdout(io.StringIO()):
        st = cli.build_report([old, new], out=tmp_path / "out", resamples=200).stats
    primary = st.primary
    mine = primary[primary["config_hash"] == mka_new["config_hash"]]
    assert len(mine) == 2 and set(mine["baseline_hash"]) == {rp_new["config_hash"]}
    assert (mine["family_size"] == 2).all()
    assert (mine["significant"] == (mine["p_holm"] < 0.01)).all()
    older = primary[primary["config_hash"] != mka_new["config_hash"]]
    assert len(older) > 2 and rp_new["config_hash"] not in set(older["baseline_hash"])
    assert set(older["declaration"]) == {str(old / "compare.yaml")}
    text = document.declaration_text(st)
    assert "declared before the runs" in text and "declared retrospectively" in text
    assert text.index(str(old / "compare.yaml")) < text.index("declared retrospectively")
    assert "Of the 2 declared comparisons in 1 families" in text  # the new grid's own count
    shutil.copy(old / "records" / f"{rp['config_hash']}.json", new / "records")
    with pytest.raises(loading.ReportError, match=rf"record {rp['config_hash']}: .* declare"):
        cli.build_report([old, new], out=tmp_path / "out2", resamples=200)


def test_a_declaration_carried_by_many_records_is_named_once():
    """Every record of a declared grid carries the same `config.compare`: the paragraph counts
    them instead of listing each."""
    many = ", ".join(f"record {h} (config.compare)" for h in ("aa11", "bb22", "cc33"))
    assert document.source_names(many) == "`config.compare` of 3 records (aa11, bb22, cc33)"
    both = "/x/compare.yaml, " + ", ".join(f"record {i:04d} (config.compare)" for i in range(9))
    assert document.source_names(both) == (
        "`/x/compare.yaml`, `config.compare` of 9 records (0000, 0001, 0002, ...)"
    )
    assert document.source_names("record aa11 (config.compare)") == "`record aa11 (config.compare)`"


def test_declaration_errors_are_one_line_with_suggestions(sweep):
    root, _ = sweep
    with pytest.raises(loading.ReportError, match=r"method='mk' is not a method.*did you mean mka"):
        declare(
            root, "declared: retrospective\nprimary:\n  - a: {method: mk}\n    b: best_pruning\n"
        )
    with pytest.raises(loading.ReportError, match=r"option 'lambda' does not label a mka variant"):
        declare(root, "declared: retrospective\nprimary:\n  - a: {method: mka, lambda: code}\n"
                      "    b: best_pruning\n")  # fmt: skip
    with pytest.raises(loading.ReportError, match=r"declared=None is not allowed; one of"):
        declare(root, "primary: []\n")
    with pytest.raises(loading.ReportError, match=r"primry.*did you mean primary"):
        declare(root, "declared: retrospective\nprimry: []\n")


def test_the_compare_key_never_changes_a_config_hash():
    record = next(Path("docs/evidence/smollm2_tasks/records").glob("*.json"))
    loaded = json.loads(record.read_text())
    config = loaded["config"] | {"compare": {"declared": "before the runs", "primary": []}}
    assert results.config_hash(config) == loaded["config_hash"] == record.stem


def test_tables_and_plots_carry_intervals(swept):
    out, printed, _ = swept
    table = pd.read_csv(out / "table2.csv")
    dense = table[table["method"] == "none"].iloc[0]
    assert dense["piqa_low"] < dense["piqa"] < dense["piqa_high"]
    assert re.search(
        r"\| none \|  \| 0 \| 4 \| \| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] \|", printed
    ) or (f"{dense['piqa']:.2f} [{dense['piqa_low']:.2f}, {dense['piqa_high']:.2f}]" in printed)
    assert (out / "plots" / "curve_tiny_llama.png").read_bytes().startswith(PNG_MAGIC)


def test_curve_plot_draws_error_bars_dense_and_chance():
    from matplotlib.container import ErrorbarContainer

    runs = pd.DataFrame(
        {
            "method": ["none", "shortgpt", "shortgpt"],
            "variant": ["", "", ""],
            "compression_ratio": [0.0, 0.25, 0.5],
            "piqa": [60.0, 55.0, 52.0],
            "piqa_low": [55.0, 50.0, 47.0],
            "piqa_high": [65.0, 60.0, 57.0],
        }
    )
    ax = figures.new_figure().add_subplot()
    figures.plot_ours(ax, runs, "piqa")
    figures.plot_references(ax, runs, "piqa", (0.5, "random guess"))
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one per method line
    levels = {line.get_label(): line.get_ydata()[0] for line in ax.lines if "(" in line.get_label()}
    assert levels["dense (60.0)"] == 60.0 and levels["chance (random guess, 50.0)"] == 50.0


def test_curve_figure_is_small_multiples_with_registry_styles_and_an_outside_legend(tmp_path):
    from mka_exp.methods import registry

    runs = pd.DataFrame({
        "method": ["none", "shortgpt", "shortgpt", "sleb", "laco"],
        "variant": ["", "", "", "", ""],
        "compression_ratio": [0.0, 0.25, 0.5, 0.25, 0.25],
        "piqa": [60.0, 55.0, 52.0, 54.0, 53.0],
        "boolq": [62.0, 61.0, 60.0, np.nan, 59.0],
    })  # fmt: skip
    chance = {"piqa": (0.5, "random guess"), "boolq": (0.62, "majority answer")}
    captured = {}
    original = figures.save

    def keep(fig, path):
        captured["fig"] = fig
        return original(fig, path)

    figures.save = keep
    try:
        path = figures.curve_figure(
            runs, tables.load_paper(), "m", ["piqa", "boolq"], tmp_path, chance
        )
    finally:
        figures.save = original
    fig = captured["fig"]
    panels = [ax for ax in fig.axes if ax.has_data()]
    assert [ax.get_title() for ax in panels] == ["piqa", "boolq"]  # one panel per task
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in panels)
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["none", "shortgpt", "sleb", "laco"]  # each once, in display order
    for handle, label in zip(legend.legend_handles, labels, strict=True):
        assert handle.get_color() == registry.info(label).color
        assert handle.get_marker() == registry.info(label).marker
    texts = [t.get_text() for t in panels[1].texts]
    assert "dense 62.0" in texts and "chance (majority answer) 62.0" in texts  # on the lines
    # the legend is outside every panel
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert all(not box.overlaps(ax.get_window_extent()) for ax in panels)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_calibration_sensitivity(swept):
    out, _, _ = swept
    table = pd.read_csv(out / "calibration_sensitivity.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["seeds"], row["layer_choices"], row["seeds_off_most_common"]) == (3, 2, 1)
    values = [0.5, 0.0, 0.5]  # acc 1 on even or odd doc ids of 24, or 0
    assert row["piqa acc mean"] == pytest.approx(np.mean(values))
    assert row["piqa acc range"] == pytest.approx(0.5)
    assert row["piqa acc sd"] == pytest.approx(np.std(values, ddof=1))
    assert "## Calibration sensitivity" in (out / "statistics.md").read_text()


def test_generated_doc_keeps_the_hand_written_part(sweep, swept):
    root, _ = sweep
    _, _, doc = swept
    first = doc.read_text()
    assert first.startswith(document.GENERATED) and "python -m mka_exp.report" in first
    assert "--markdown" in first and "tiny_llama (4 layers)" in first
    assert "## Previous hand-written version (kept)" in first and "| x | 0.5 |" in first
    assert cli.main([str(root), "--markdown", str(doc), "--resamples", "200"]) == 0
    again = doc.read_text()
    assert again.count("| x | 0.5 |") == 1 and again.count(document.KEPT) == 1
    assert stat.S_IMODE(doc.stat().st_mode) == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--baseline", "shortgp"],
            "--baseline shortgp: no records of that method (methods: ",
        ),
        (["--baseline", "shortgpt"], None),
    ],
)
def test_baseline_option(sweep, tmp_path, capsys, args, message):
    root, _ = sweep
    code = cli.main([str(root), "--out", str(tmp_path), "--resamples", "200", *args])
    err = capsys.readouterr().err.strip()
    if message:
        assert code == 2 and err.startswith(f"error: {message}") and "\n" not in err
        assert err.endswith("; did you mean shortgpt?)")
        return
    assert code == 0
    text = (tmp_path / "statistics.md").read_text()
    assert "### Against shortgpt (cross-fitted) at 2 of 4 layers removed" in text
    assert "no baseline" not in text.split("Against shortgpt (cross-fitted) at 1")[0]


def test_baseline_missing_at_a_layer_count_is_one_line(sweep, tmp_path):
    root, runs = sweep
    assert cli.main([str(root), "--out", str(tmp_path), "--baseline", "mka",
                        "--resamples", "200"]) == 0  # fmt: skip
    text = (tmp_path / "statistics.md").read_text()
    for column in ("piqa acc", "piqa acc_norm", "boolq acc"):
        line = f"- no baseline at 2 layers removed for {column}: no mka record with per-example "
        assert text.count(line + "records there") == 1


def test_protocol_line_names_the_shots_of_the_evaluated_tasks_only():
    config = {"eval": {"tasks": ["mmlu"], "limit": 3,
                       "num_fewshot": {"mmlu": 0, "piqa": 0, "boolq": 5}}}  # fmt: skip
    assert document.eval_protocol(config) == "tasks mmlu, limit 3 (the first examples), mmlu 0-shot"


def test_protocol_line_names_the_sample_seed():
    config = {"eval": {"tasks": ["piqa"], "limit": 20, "sample_seed": 7, "num_fewshot": {}}}
    assert "limit 20 (a draw with sample_seed 7)" in document.eval_protocol(config)


def test_several_outputs_dirs_report_as_one(sweep, tmp_path, capsys):
    """The sweep's records split over two outputs dirs give the same statistics as one dir."""
    root, runs = sweep
    one = tmp_path / "one"
    dense = {runs["none"]["config_hash"], runs["mka"]["config_hash"]}
    parts = [tmp_path / "a", tmp_path / "b"]
    for path in sorted((root / "records").glob("*")):
        part = parts[0] if path.name.split(".")[0] in dense else parts[1]
        (part / "records").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, part / "records" / path.name)
    doc, out = tmp_path / "doc.md", tmp_path / "out"
    argv = [*map(str, parts), "--out", str(out), "--markdown", str(doc), "--resamples", "2000"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
        assert cli.main([str(root), "--out", str(one), "--resamples", "2000"]) == 0
    for name in ("accuracy_intervals.csv", "paired_differences.csv"):
        merged = pd.read_csv(out / name, dtype={"config_hash": str})
        alone = pd.read_csv(one / name, dtype={"config_hash": str})
        pd.testing.assert_frame_equal(merged, alone)
    assert f"records in `{parts[0]}`, `{parts[1]}` by" in doc.read_text()
    assert cli.main([*map(str, parts)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: several sources need --out DIR (where the report goes)"
    )


def test_variant_names_the_repair_and_cost_table_lists_its_seconds_and_bytes():
    linear, none = "mka_exp.repair.linear.LinearRepair", "mka_exp.repair.none.NoRepair"
    table = pd.DataFrame({
        "config_hash": ["a", "b", "c"], "model": "m", "quantizer": "none",
        "method": ["shortgpt", "shortgpt", "mka"], "layers_before": 8, "layers_after": 6,
        "config.repair._target_": [none, linear, linear],
        "config.repair.ridge": [np.nan, 0.0, 0.0],  # only a linear repair has options
    })  # fmt: skip
    df = loading.prepare(table)
    labels = dict(zip(df["config_hash"], df["variant"], strict=True))
    assert labels == {"a": "repair=none", "b": "repair=linear", "c": "repair=linear"}
    records = {
        "a": {"timings": {"compress": 3.2, "evaluate": 40.0}, "peak_rss_bytes": 3 * 2**30},
        "b": {
            "timings": {"compress": 3.0, "repair_capture": 5.4, "repair": 7.6, "evaluate": 41},
            "repair_stats": {"held_bytes": 300 * 2**20},
        },
    }
    acc = df.assign(removed=2)[["config_hash", "method", "variant", "removed"]]
    lines = sections.cost_table(acc, records).splitlines()
    assert set(lines[2:]) == {
        "| shortgpt | repair=none | 2 | 3 |  |  | 40 | 3.0 GiB |",
        "| shortgpt | repair=linear | 2 | 3 | 5 + 8 | 300 MiB | 41 |  |",
        "| mka | repair=linear | 2 |  |  |  |  |  |",  # no record: no figures, not made up
    }


def test_repaired_run_is_paired_with_its_unrepaired_twin(sweep, tmp_path):
    """A planted repaired twin of a shortgpt run (every piqa answer right) is compared with that
    run on the same examples; runs without a twin are left out."""
    root, _ = sweep
    short = next(
        json.loads(p.read_text())
        for p in (root / "records").glob("*.json")
        if '"method": "shortgpt"' in p.read_text() and '"layers_after": 2' in p.read_text()
    )
    twin = json.loads(json.dumps(short))
    twin["config"]["repair"] = {"_target_": "mka_exp.repair.linear.LinearRepair", "ridge": 0.0}
    twin["config"]["method"]["cache"] = "/elsewhere/cache"  # a path: twins on another machine
    twin["config_hash"] = results.config_hash(twin["config"])
    rows = samples.read_samples(root, short)
    right = rows.assign(acc=rows["acc"].where(rows["task"] != "piqa", 1.0))
    copy = tmp_path / "with_twin"
    shutil.copytree(root / "records", copy / "records")
    twin["samples"] = samples.write_samples(copy, twin["config_hash"], right)
    twin["metrics"] = samples.aggregate(right)
    results_table.save_record(copy, twin)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([str(copy), "--out", str(tmp_path / "out"), "--resamples", "500"]) == 0
    text = (tmp_path / "out" / "statistics.md").read_text()
    assert "### Repair against the same run without it" in text
    piqa = rows[rows["task"] == "piqa"]
    gain = 100 * (1 - piqa["acc"].mean())
    assert f"+{gain:.1f} [" in text.split("### Repair against")[1]


def test_variant_shows_a_task_list_compactly(tmp_path):
    """Runs of one method evaluated on different task lists are told apart by `tasks=a+b`, not
    by the list's Python repr."""
    table = pd.DataFrame({
        "config_hash": ["a", "b"], "model": "m", "quantizer": "none", "method": "shortgpt",
        "layers_before": 8, "layers_after": 6,
        "config.eval.tasks": [["piqa"], ["piqa", "boolq"]],
    })  # fmt: skip
    df = loading.prepare(table)
    labels = dict(zip(df["config_hash"], df["variant"], strict=True))
    assert labels == {"a": "tasks=piqa", "b": "tasks=piqa+boolq"}
    (tmp_path / "records").mkdir()  # the same from records, as the report reads them
    for name, tasks in (("a", ["piqa"]), ("b", ["piqa", "boolq"])):
        record = {"config_hash": name, "config": {"eval": {"tasks": tasks}}, "metrics": {}}
        (tmp_path / "records" / f"{name}.json").write_text(json.dumps(record))
    read = loading.attach_configs(table.drop(columns="config.eval.tasks"), tmp_path)
    assert list(read["config.eval.tasks"]) == ["piqa", "piqa+boolq"]


def test_variant_names_the_calibration_source_first():
    """A twin on another calibration source (issue 28: 200 k passages, not MMLU prompts) says
    which source, before its other differing keys, by the builder's name."""
    many = {f"config.calib.k{i}": [1, 2] for i in range(5)}  # more than MAX_VARIANT_KEYS differ
    table = pd.DataFrame({
        "config_hash": ["a", "b"], "model": "m", "quantizer": "none", "method": "mka",
        "layers_before": 8, "layers_after": 6, **many,
        "config.calib._target_": ["mka_exp.calibration.mmlu_prompts",
                                  "mka_exp.calibration.hellaswag_passages"],
    })  # fmt: skip
    labels = dict(
        zip(*[loading.prepare(table)[c] for c in ("config_hash", "variant")], strict=True)
    )
    assert labels["a"].startswith("calib=mmlu_prompts, calib.k0=1")
    assert labels["b"].startswith("calib=hellaswag_passages, calib.k0=2")
    one = loading.prepare(table.assign(**{"config.calib._target_": "x.calibration.mmlu_prompts"}))
    assert not one["variant"].str.contains("calib=").any()  # the same source labels nothing


def test_the_report_names_damaged_records_and_leaves_them_in_place(sweep, tmp_path):
    root, runs = sweep
    copy = tmp_path / "damaged"
    shutil.copytree(root / "records", copy / "records")
    cut = copy / "records" / f"{runs['perfect']['config_hash']}.json"
    cut.write_bytes(cut.read_bytes()[:50])  # a record cut mid-write
    aside = copy / "records" / "0123abcd.json.damaged"
    aside.write_text("{")
    before = sorted((p.name, p.read_bytes()) for p in (copy / "records").iterdir())
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([str(copy), "--out", str(tmp_path / "out"), "--resamples", "200"]) == 0
    assert sorted((p.name, p.read_bytes()) for p in (copy / "records").iterdir()) == before
    text = (tmp_path / "out" / "statistics.md").read_text()
    line = next(x for x in text.splitlines() if "damaged record(s)" in x)
    assert line.startswith("- 2 damaged record(s), not read and left where they are: ")
    assert f"{cut}: not JSON" in line and f"{aside}: moved aside by an earlier run" in line


def without_choices(root: Path) -> None:
    """Rewrite every record under `root` as one made before `choice_ll`/`choice_len` existed."""
    for path in sorted((root / "records").glob("*.json")):
        record = json.loads(path.read_text())
        rows = samples.read_samples(root, record).assign(choice_ll=None, choice_len=None)
        record["samples"] = samples.write_samples(root, record["config_hash"], rows)
        results_table.save_record(root, record)


def test_runs_with_choice_log_likelihoods_get_a_distance_section(sweep, tmp_path):
    """A planted dense run always right, and a compressed one that swaps the two choices on even
    doc ids: half the answers flip, all correct->wrong, KL as computed by hand."""
    root, runs = sweep
    copy = tmp_path / "choices"
    shutil.copytree(root / "records", copy / "records")
    without_choices(copy)  # the sweep's runs as older records: only the planted ones have them
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([str(copy), "--out", str(tmp_path / "older"), "--resamples", "50"]) == 0
    older = (tmp_path / "older" / "statistics.md").read_text()
    assert "none of these" in older and "so this document has no such section" in older
    rows = samples.read_samples(root, runs["none"])
    right = [[0.0, -1.0] if t == 0 else [-1.0, 0.0] for t in pd.to_numeric(rows["target"])]
    dense = rows.assign(choice_ll=right, choice_len=[[5, 5]] * len(rows))
    swap = [ll[::-1] if d % 2 == 0 else ll for ll, d in zip(right, rows["doc_id"], strict=True)]
    short = next(json.loads(p.read_text()) for p in (root / "records").glob("*.json")
                 if '"method": "shortgpt"' in p.read_text() and '"layers_after": 3' in p.read_text())  # fmt: skip
    swapped = samples.read_samples(root, short).assign(
        choice_ll=swap, choice_len=[[5, 5]] * len(rows)
    )
    planted(copy, runs["none"], "none", dense, bandwidth="with_choices")
    planted(copy, short, "shortgpt", swapped, representation="with_choices")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([str(copy), "--out", str(tmp_path / "out"), "--resamples", "500"]) == 0
    table = pd.read_csv(tmp_path / "out" / "distance_to_dense.csv")
    assert len(table) == 2 and set(table["task"]) == {"piqa", "boolq"}  # the planted run only
    p, q = (
        np.exp([0.0, -1.0]) / np.exp([0.0, -1.0]).sum(),
        np.exp([-1.0, 0.0]) / np.exp([-1.0, 0.0]).sum(),
    )
    kl = float(np.sum(p * np.log(p / q)))
    for _, row in table.iterrows():
        assert (
            row["flips"] == 0.5 and row["correct_to_wrong"] == 0.5 and row["wrong_to_correct"] == 0
        )
        assert row["kl"] == pytest.approx(kl / 2, rel=1e-12)
        assert row["flips_norm"] == 0.5  # equal lengths: acc_norm flips with acc
    text = (tmp_path / "out" / "statistics.md").read_text()
    assert "### Distance to the dense model" in text
    assert "1 of the" in text.split("Distance to the dense model (flips")[1][:80]  # one run
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "distance_power.py"
    spec = importlib.util.spec_from_file_location("distance_power", script)
    distance_power = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distance_power)
    planted(copy, short, "shortgpt", dense, representation="no_flip")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert distance_power.main([str(copy)]) == 0
    lines = printed.getvalue().splitlines()
    pairs = [x for x in lines if "representation=with_choices" in x and "=no_flip" in x]
    assert len(pairs) == 2 and all("| 24 | -50 |" in x or "| 24 | 50 |" in x for x in pairs)
    assert lines[-1].startswith("2 pairs; median ratio ")


def test_cross_fit_chooses_on_the_other_half():
    from mka_exp.report import crossfit

    keys = pd.DataFrame({"subtask": "t", "doc_id": np.arange(8)})
    # x is perfect on half A (even doc_ids), y on half B (odd): each is chosen for the other half
    x = keys.assign(y=(keys["doc_id"] % 2 == 0).astype(float))
    y = keys.assign(y=(keys["doc_id"] % 2 == 1).astype(float))
    composite = crossfit.cross_fit([("hx", "x", x), ("hy", "y", y)], macro=False)
    assert composite.hashes == ("hy", "hx")  # on A: y (chosen on B); on B: x (chosen on A)
    assert composite.outcomes["y"].tolist() == [0.0] * 8  # neither's luck carries over
    same = crossfit.cross_fit([("hx", "x", x.assign(y=1.0)), ("hy", "y", y)], macro=False)
    assert same.hashes == ("hx", "hx") and "chosen on each half" in same.describe()


def test_layers_text_names_laco_merges_like_mka_merges():
    """LaCo records each merge as a kept layer and the layers merged into it; MKA as kept and
    dropped. Both read kept+merged."""
    laco = {"merges": [{"keep": 26, "merged": [27, 28]}, {"keep": 20, "merged": [21]}]}
    mka = {"merges": [{"keep": 28, "drop": 29}]}
    assert sections.layers_text({"method_stats": laco}) == "26+27+28 20+21"
    assert sections.layers_text({"method_stats": mka}) == "28+29"
    assert sections.layers_text({"method_stats": {"removed_layers": [5, 3]}}) == "3 5"


def test_a_run_that_gives_one_answer_is_flagged_with_the_targets_share(sweep, tmp_path):
    """A planted run answering "0" to every boolq question scores that answer's share of the
    targets: the report names it, the share and the base rate; balanced runs are not named."""
    root, _ = sweep
    short = next(
        json.loads(p.read_text())
        for p in (root / "records").glob("*.json")
        if '"method": "shortgpt"' in p.read_text() and '"layers_after": 2' in p.read_text()
    )
    copy = tmp_path / "one_answer"
    shutil.copytree(root / "records", copy / "records")
    rows = samples.read_samples(root, short)
    boolq = rows["task"] == "boolq"
    targets = pd.to_numeric(rows["target"])
    always = rows.assign(
        pred=rows["pred"].where(~boolq, 0),
        acc=rows["acc"].where(~boolq, (targets == 0).astype(float)),
    )
    planted(copy, short, "mka", always, bandwidth="always_no")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([str(copy), "--out", str(tmp_path / "out"), "--resamples", "200"]) == 0
    out = tmp_path / "out"
    flagged = pd.read_csv(out / "one_answer.csv", dtype={"config_hash": str})
    base_rate = (targets[boolq] == 0).mean()
    hit = flagged[flagged["variant"].fillna("").str.contains("always_no")]
    assert len(hit) == 1 and hit["task"].iloc[0] == "boolq" and hit["answer"].iloc[0] == 0
    assert hit["share"].iloc[0] == 1.0
    assert hit["target_share"].iloc[0] == pytest.approx(base_rate)
    assert hit["n"].iloc[0] == boolq.sum()
    text = (out / "statistics.md").read_text()
    line = next(x for x in text.splitlines() if "always_no" in x and "one answer" in x)
    assert f"{100 * base_rate:.1f} %" in line and "boolq" in line
    verdict = text.split("### Does merging beat pruning?")[1]
    row = next(x for x in verdict.splitlines() if x.startswith("| 2 | boolq acc |"))
    assert "always_no" in row and row.rstrip(" |").endswith(("merging", "both"))
    assert "involve a run that gives one answer" in verdict
    own = rows[boolq]["pred"].value_counts(normalize=True).iloc[0]  # the unplanted original
    named = (flagged["config_hash"] == short["config_hash"]) & (flagged["task"] == "boolq")
    assert named.any() == (own >= sensitivity.ONE_ANSWER_SHARE)


EVIDENCE = Path(__file__).resolve().parent.parent / "docs" / "evidence"


def evidence_stats(name: str, seed: int) -> analysis.Stats:
    root = EVIDENCE / name
    table, _ = loading.load_table(root)
    decl = declared.load_declarations([root], loading.load_records(root))
    return analysis.compute_stats(loading.prepare(table), root, boot=analysis.Boot(1000, seed),
                                  declarations=decl)  # fmt: skip


def test_marks_on_the_committed_evidence_do_not_move_with_the_bootstrap_seed():
    """Qwen-1.5B MMLU is the committed evidence with macro averages, the only intervals that
    resample; a mark is Holm on McNemar's exact p, so five seeds give the same marks (and the
    same p) while the macro intervals move. Single-task intervals (Newcombe) take no seed."""
    runs = [evidence_stats("qwen15b_mmlu", seed) for seed in range(5)]
    marks = [tuple(st.primary["significant"]) for st in runs]
    assert len(marks[0]) > 0 and len(set(marks)) == 1
    assert all(st.primary["p_holm"].equals(runs[0].primary["p_holm"]) for st in runs)
    lows = {tuple(st.differences["low"].round(12)) for st in runs}
    assert len(lows) > 1  # the bootstrap did resample: the check above could have failed
    a, b = np.r_[np.ones(40), np.zeros(60)], np.r_[np.ones(30), np.zeros(70)]
    assert stats.paired(a, b, seed=1).difference == stats.paired(a, b, seed=2).difference


def test_the_hand_written_reading_quotes_the_one_answer_counts_of_the_records():
    """The kept reading of docs/method_comparison.md states how many runs give one answer; the
    records decide (issue 27: it said 13 and 16 where they give 16 and 17)."""
    doc = (EVIDENCE.parent / "method_comparison.md").read_text().split(document.KEPT, 1)[1]
    said = re.search(r"boolq for (\d+) Qwen-0\.5B runs and (\d+) SmolLM2 runs", doc)
    mmlu = re.search(r"MMLU for (\d+) Qwen-1\.5B runs", doc)
    assert said and mmlu, "the reading no longer states the one-answer counts: update this test"
    counted = {}
    for name in ("qwen05b_tasks", "smollm2_tasks", "smollm2_seeds", "qwen15b_declared"):
        root = EVIDENCE / name
        table, _ = loading.load_table(root)
        df = loading.prepare(table)
        df = df.assign(
            removed=loading.column(df, "layers_before") - loading.column(df, "layers_after")
        )
        frames, _ = loading.read_all_samples(df, loading.load_records(root), root)
        flagged = sensitivity.one_answer_runs(df, frames)
        for (model, task), n in flagged.groupby(["model", "task"]).size().items():
            counted[(model, task)] = counted.get((model, task), 0) + n
    assert int(said[1]) == counted[("qwen25_coder_05b", "boolq")]
    assert int(said[2]) == counted[("smollm2_135m", "boolq")]
    assert int(mmlu[1]) == counted[("qwen25_coder_15b", "mmlu")]
    assert not re.search(r"\btie[sd]?\b", doc)  # "not detected (MDE x)", never a tie


def test_the_compare_group_declares_without_changing_the_config_hash(tmp_path, data_root):
    from omegaconf import OmegaConf

    from tests.helpers import compose_config

    plain = compose_config([], tmp_path, data_root)
    declaring = compose_config(["+compare=mka_vs_pruning"], tmp_path, data_root)
    as_dict = OmegaConf.to_container(declaring, resolve=True)
    assert results.config_hash(as_dict) == results.config_hash(
        OmegaConf.to_container(plain, resolve=True)
    )
    decl = declared.parse(as_dict["compare"], "config.compare")
    assert decl.when == "before the runs" and decl.repair_twins and len(decl.primary) == 2
    assert decl.primary[1][1].method == declared.BEST


def test_a_chosen_pruning_carried_in_a_record_parses_as_committed():
    """A record's `config.compare` went through JSON, where the layer counts of `chosen:` are
    strings: it declares the same choices as the committed yaml."""
    path = Path(__file__).parents[1] / "conf" / "compare" / "qwen15b_declared.yaml"
    committed = yaml.safe_load(path.read_text())
    carried = json.loads(json.dumps(committed))
    assert "4" in carried["chosen"]["qwen25_coder_15b"]
    parsed = declared.parse(carried, "config.compare")
    assert parsed.chosen == declared.parse(committed, "compare.yaml").chosen
    assert [cut for (_, cut), _ in parsed.chosen] == [4, 7]
    carried["chosen"]["qwen25_coder_15b"]["four"] = carried["chosen"]["qwen25_coder_15b"]["4"]
    with pytest.raises(
        loading.ReportError, match=r"chosen\.qwen25_coder_15b='four' is not allowed; a layer count"
    ):
        declared.parse(carried, "config.compare")


def test_repair_twins_pair_across_the_eval_target_key():
    """A record written before evaluation had a `_target_` and one written after (the default
    backend's name in its config) are the same experiment: the hash says so, so must the twin
    key, or a new repaired run would find no unrepaired twin among the committed records."""
    from mka_exp.report.analysis import twin_key
    from mka_exp.results.records import DEFAULT_EVAL_BACKEND

    old = {"config": {"method": {"ratio": 0.25}, "eval": {"tasks": ["piqa"], "limit": 5},
                      "repair": {"_target_": "mka_exp.repair.none.NoRepair"}}}  # fmt: skip
    new = json.loads(json.dumps(old))
    new["config"]["eval"]["_target_"] = DEFAULT_EVAL_BACKEND
    new["config"]["repair"] = {"_target_": "mka_exp.repair.linear.LinearRepair", "ridge": "auto"}
    assert twin_key(new) == twin_key(old)
    other = json.loads(json.dumps(new))
    other["config"]["eval"]["_target_"] = "mka_exp.evaluation.vllm.VLLMEvaluation"
    assert twin_key(other) != twin_key(old)  # another backend is another experiment


# ---------------------------------------------------------------- best pruning chosen beforehand


def validation_rows(
    task: str, correct: list[int], subjects=("anatomy", "virology")
) -> pd.DataFrame:
    """Per-example rows of `task` over two subjects, `correct[i]` the outcome of example i."""
    rows = []
    for i, y in enumerate(correct):
        subject = subjects[i % len(subjects)]
        rows.append({"task": task, "subtask": f"{task}_{subject}", "doc_id": i // len(subjects),
                     "doc_hash": f"d{i}", "prompt_hash": f"p{i}", "target": 0, "pred": 1 - y,
                     "acc": float(y), "acc_norm": None, "filter": "none", "choice_ll": None,
                     "choice_len": None})  # fmt: skip
    return pd.DataFrame(rows, columns=list(samples.COLUMNS))


def selection_run(root: Path, method: str, removed: int, correct: list[int], **cfg) -> dict:
    record = make_record("qwen25_coder_15b", method, 28, 28 - removed, {}, **cfg)
    rows = validation_rows("mmlu_val", correct)
    record["samples"] = samples.write_samples(root, record["config_hash"], rows)
    record["metrics"] = samples.aggregate(rows)
    results_table.save_record(root, record)
    return record


@pytest.fixture
def selection_phase(tmp_path) -> Path:
    """Pruning runs on validation questions at 4 and 7 removed, an MKA run that scores best
    (not a candidate: merging), and a declaration with the marker line."""
    root = tmp_path / "select"
    selection_run(root, "reverse_prune", 4, [1] * 12 + [0] * 8, keep_final=False)
    selection_run(root, "shortgpt", 4, [1] * 16 + [0] * 4, representation="tokens")
    selection_run(root, "angular", 4, [1] * 16 + [0] * 4, representation="last")  # a tie: later
    selection_run(root, "sleb", 7, [1] * 10 + [0] * 10)
    selection_run(root, "reverse_prune", 7, [1] * 9 + [0] * 11, keep_final=False)
    selection_run(root, "mka", 4, [1] * 20, lam="code")
    return root


def test_select_best_names_the_best_pruning_per_cut_and_writes_it_once(
    selection_phase, tmp_path, capsys
):
    decl = tmp_path / "compare.yaml"
    head = "declared: before the runs\nprimary:\n  - a: {method: mka}\n    b: chosen_pruning\n"
    decl.write_text(head + f"{declared.MARKER}: written below\nchosen: {{}}\n")
    args = ["select-best", str(selection_phase), "--task", "mmlu_val", "--into", str(decl)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "chosen    shortgpt (representation=tokens): 0.8000" in out
    assert "runner-up angular (representation=last): 0.8000" in out  # ties: registry order
    assert "chosen    sleb: 0.5000" in out and "runner-up reverse_prune" in out
    assert "mka" not in out.split("written to")[0]  # merging is never a candidate
    assert "experiment=qwen15b_declared_repair method=shortgpt method.num_layers=4" in out
    for experiment in ("qwen15b_declared_repair", "qwen15b_declared_twin"):  # a short search
        assert (f"experiment={experiment} method=sleb method.num_layers=7 "
                "method.search_tokens=1000 $O") in out  # fmt: skip
    text = decl.read_text()
    assert text.startswith(head)  # the declaration above the marker is kept as written
    parsed = declared.parse(yaml.safe_load(text), "compare.yaml")
    chosen = dict(parsed.chosen)
    assert chosen[("qwen25_coder_15b", 4)] == declared.Side(
        "shortgpt", (("representation", "tokens"),)
    )
    assert chosen[("qwen25_coder_15b", 7)].method == "sleb"
    note = yaml.safe_load(text)["chosen"]["qwen25_coder_15b"][4]["selected_on"]
    assert note.startswith("mmlu_val acc, highest of 3: shortgpt") and "runner-up angular" in note
    assert cli.main(args) == 0  # the same choice again: kept, nothing changes
    assert decl.read_text() == text
    selection_run(selection_phase, "angular", 4, [1] * 20, representation="tokens")
    assert cli.main(args) == 2  # a different choice for a chosen cut is refused
    assert "chosen.qwen25_coder_15b.4 is already shortgpt" in capsys.readouterr().err
    assert decl.read_text() == text


def test_select_best_needs_pruning_runs_with_rows_of_the_task(selection_phase, capsys):
    assert cli.main(["select-best", str(selection_phase), "--task", "mmlu"]) == 2
    assert "no unquantized, unrepaired pruning run" in capsys.readouterr().err


def test_chosen_pruning_is_side_b_per_cut(tmp_path):
    """`b: chosen_pruning` pairs MKA with the method chosen for its model and cut, on A's
    calibration source when the method also ran on another; without a choice: a note."""
    root = tmp_path / "test"
    calib = {"_target_": "mka_exp.calibration.mmlu_prompts"}
    runs = []
    for method, cfg, correct in (("mka", {"lam": "code"}, [1] * 14 + [0] * 6),
                                 ("shortgpt", {"representation": "tokens"}, [1] * 10 + [0] * 10),
                                 ("angular", {}, [1] * 20)):  # fmt: skip
        record = make_record("qwen25_coder_15b", method, 28, 24, {}, **cfg)
        record["config"]["calib"] = calib
        record["config_hash"] = results.config_hash(record["config"])
        rows = validation_rows("mmlu", correct)
        record["samples"] = samples.write_samples(root, record["config_hash"], rows)
        record["metrics"] = samples.aggregate(rows)
        results_table.save_record(root, record)
        runs.append(record)
    other = json.loads(json.dumps(runs[1]))  # shortgpt again, on passages: not B for MKA
    other["config"]["calib"] = {"_target_": "mka_exp.calibration.hellaswag_passages"}
    other["config_hash"] = results.config_hash(other["config"])
    other["samples"] = samples.write_samples(
        root, other["config_hash"], validation_rows("mmlu", [0] * 20)
    )
    results_table.save_record(root, other)
    text = ("declared: before the runs\nprimary:\n  - a: {method: mka, calib: mmlu_prompts}\n"
            "    b: chosen_pruning\n" + declared.MARKER + "\nchosen:\n  qwen25_coder_15b:\n"
            "    4: {method: shortgpt, representation: tokens, selected_on: test}\n")  # fmt: skip
    st = declare(root, text)
    assert len(st.primary) == 1
    row = st.primary.iloc[0]
    assert row["baseline_hash"] == runs[1]["config_hash"]  # the chosen one, on MKA's calibration
    assert "chosen beforehand" in row["comparison"] and row["difference"] == pytest.approx(0.2)
    both = text.replace(
        "primary:\n",
        "primary:\n  - a: {method: mka, calib: mmlu_prompts}\n"
        "    b: {method: shortgpt, representation: tokens}\n",
    )
    st = declare(root, both)  # the chosen pruning is the other declared B: one test, not two
    assert len(st.primary) == 1 and st.primary.iloc[0]["family_size"] == 1
    assert "also the pruning chosen beforehand" in st.primary.iloc[0]["comparison"]
    st = declare(root, text.replace("4: {", "7: {"))
    assert st.primary.empty
    assert st.notes["text"].str.contains("no pruning method chosen for qwen25_coder_15b at 4").any()


def test_the_declared_qwen15b_experiment_composes_and_passes_the_preflight(tmp_path, data_root):
    """Every point of issue 28's sweeps composes with the intended settings, every key is one
    something reads, and the preflight (no model) passes; the declaration parses."""
    from omegaconf import OmegaConf

    from mka_exp import canonical, preflight
    from tests.helpers import CONF, compose_config

    sweeps = {"qwen15b_declared": ("reverse_prune,shortgpt,angular,laco,mka", "mmlu"),
              "qwen15b_declared_select": ("reverse_prune,shortgpt,angular", "mmlu_val"),
              "qwen15b_declared_repair": ("mka", "mmlu"), "qwen15b_declared_twin": ("mka", "mmlu")}  # fmt: skip
    for experiment, (methods, task) in sweeps.items():
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            full = compose("config", [f"experiment={experiment}"], return_hydra_config=True)
        params = {"method": methods, "method.ratio": "null", "method.num_layers": "4,7"}
        assert dict(full.hydra.sweeper.params) == params
        assert full.model.name == "qwen25_coder_15b"
        ev = OmegaConf.to_container(full.eval)
        assert (ev["tasks"], ev["limit"], ev["sample_seed"], ev["num_fewshot"][task]) == (
            [task],
            20,
            28,
            0,
        )
        for method in methods.split(","):
            for layers in (4, 7):
                point = [f"experiment={experiment}", f"method={method}", "method.ratio=null", f"method.num_layers={layers}",
                         "model=tiny_llama", "eval.limit=20", "calib.max_length=64"]  # fmt: skip
                cfg = compose_config(point, tmp_path, data_root)
                canonical.check_known_keys(OmegaConf.to_container(cfg, resolve=True), CONF)
                preflight.check_config(cfg)
        if experiment in ("qwen15b_declared", "qwen15b_declared_select"):  # SLEB: its own line
            point = [f"experiment={experiment}", "method=sleb", "method.search_tokens=1000",
                     "method.ratio=null", "method.num_layers=7", "model=tiny_llama",
                     "eval.limit=20", "calib.max_length=64"]  # fmt: skip
            cfg = compose_config(point, tmp_path, data_root)
            assert cfg.method.search_tokens == selection.SLEB_SEARCH_TOKENS == 1000
            preflight.check_config(cfg)
        if experiment == "qwen15b_declared":  # dense (no -m) and MKA's Algorithm 1
            algorithm1 = ["method=mka", "method.pairing=most_similar", "method.lam=paper",
                          "method.scope=all", "method.ratio=null", "method.num_layers=7"]  # fmt: skip
            for point in (["method=none"], algorithm1):
                shrink = ["model=tiny_llama", "eval.limit=20", "calib.max_length=64"]
                cfg = compose_config(
                    [f"experiment={experiment}", *point, *shrink], tmp_path, data_root
                )
                preflight.check_config(cfg)
        repaired = OmegaConf.to_container(full.repair)
        if experiment == "qwen15b_declared_repair":
            assert repaired["ridge"] == "auto" and repaired["max_tokens"] is None
        at_scale = experiment.endswith(("_repair", "_twin"))
        assert full.calib.get("num_tokens") == (200000 if at_scale else None)
        if experiment != "qwen15b_declared_select":
            decl = declared.parse(OmegaConf.to_container(full.compare), "compare")
            assert decl.when == "before the runs" and decl.alpha == 0.05 and decl.repair_twins
            assert [b.method for _, b in decl.primary] == ["reverse_prune", declared.CHOSEN]
        else:
            assert "compare" not in full  # the selection runs declare nothing


# ---------------------------------------------------------------- retained accuracy


def test_the_cut_of_a_quarter_or_the_nearest_cuts_either_side():
    from mka_exp.report.retained import nearest_cuts

    assert nearest_cuts(pd.Series([0, 2, 4, 8, 12]), 28) == [4, 8]  # 25 % lies between them
    assert nearest_cuts(pd.Series([4, 7, 8]), 28) == [7]  # 7 of 28 alone once it has records
    assert nearest_cuts(pd.Series([8, 12]), 28) == [8]  # nothing below: the nearest above
    assert nearest_cuts(pd.Series([0]), 28) == []


def test_retained_share_is_compressed_over_dense_with_a_covering_interval(sweep, swept):
    root, runs = sweep
    out, _, doc = swept
    kept = pd.read_csv(out / "retained.csv", dtype={"config_hash": str, "dense_hash": str})
    assert set(kept["removed"]) == {1}  # 1 of 4 layers is exactly 25 %; 2 of 4 is not shown
    assert set(kept["dense_hash"]) == {runs["none"]["config_hash"]}
    dense = samples.read_samples(root, runs["none"])
    for name in ("perfect", "mka"):
        mine = samples.read_samples(root, runs[name])
        for task in ("piqa", "boolq"):
            hit = row(kept, config_hash=runs[name]["config_hash"], column=f"{task} acc")
            ratio = (
                mine[mine["task"] == task]["acc"].mean()
                / dense[dense["task"] == task]["acc"].mean()
            )
            assert hit["retained"] == pytest.approx(ratio, abs=1e-12)
            assert hit["retained"] == pytest.approx(hit["accuracy"] / hit["dense_accuracy"])
            assert hit["low"] <= hit["retained"] <= hit["high"] and hit["n"] == 24
    text = doc.read_text()
    section = text.split("## Retained accuracy beside the literature", 1)[1].split(document.KEPT)[0]
    assert "| 1 of 4 (25.0 %) |" in section and "of 4 (50.0 %)" not in section
    piqa = dense[dense["task"] == "piqa"]["acc"].mean()  # chance beside dense: 50 % for piqa
    assert f"(24 examples; random guess 50.0 = {50 / piqa:.1f} % of dense)" in section
    fewer = r"- tiny_llama mka \(bandwidth=fewer\) -1: no dense run on the same \w+ examples"
    assert re.search(fewer, section)  # scored on fewer examples: not paired, and said so


def test_literature_rows_come_from_the_data_file_and_the_paper_file(tmp_path):
    from mka_exp.report import retained

    lit = retained.load_literature()
    shipped = pd.read_csv(Path(retained.__file__).with_name(retained.LITERATURE))
    assert list(lit["method"]) == list(shipped["method"])
    replace_me = row(lit, source="ReplaceMe")
    assert replace_me["retained_pct"] == 91.9 and replace_me["model"] == "Llama-2-7B"
    paper = tables.load_paper()
    dense = paper[(paper["model"] == "llama3_8b") & (paper["method"] == "none")
                  & (paper["task"] == "mmlu")]["acc"].iloc[0]  # fmt: skip
    mka = row(lit, source="MKA paper", method="MKA", compression=0.25)
    assert (mka["accuracy"], mka["dense_accuracy"]) == (64.28, dense) == (64.28, 66.29)
    assert mka["retained_pct"] == pytest.approx(100 * 64.28 / 66.29)
    mine = tmp_path / "literature.csv"
    shipped.iloc[:1].assign(model="Planted-1B", retained_pct=12.3).to_csv(mine, index=False)
    text = sections.literature_text(retained.load_literature(mine))
    assert "| Planted-1B |" in text and "| 12.3 |" in text and "| MKA paper |" not in text
    assert "other models (Planted-1B)" in text  # the heading names the file's models


def test_the_retained_section_labels_the_literature_as_other_models(swept):
    _, _, doc = swept
    section = doc.read_text().split("## Retained accuracy beside the literature", 1)[1]
    section = section.split(document.KEPT)[0]
    assert "other models" in section and "not a reproduction" in section
    assert "| ReplaceMe | Llama-2-7B |" in section and "| 91.9 |" in section
    assert "| MKA paper | Llama-3-8B | MKA | 25 % | mmlu | 64.28 | 66.29 | 97.0 |" in section


# ---------------------------------------------------------------- how well a repair's maps fit


def test_repair_fits_give_each_runs_residuals_on_fit_and_held_out_tokens():
    """The mean and range over a run's fits, the kept ridge's grid scale and the least-squares
    (s = 0) held-out residual, from `repair_stats`; a run without fits has no row."""
    from mka_exp.report import repair_fits

    def fit(before, after, held_before, held_after, ridge, grid):
        return {"residual_before": before, "residual_after": after, "ridge": ridge,
                "heldout_residual_before": held_before, "heldout_residual_after": held_after,
                "ridge_grid": [{"scale": s, "ridge": r, "heldout_residual": h} for s, r, h in grid]}  # fmt: skip

    repaired = make_record("qwen25_coder_15b", "mka", 28, 21, {})
    repaired["config_hash"] = "r"
    repaired["repair_stats"] = {"tokens": 200_037, "heldout_tokens": 20_010, "ridge": "auto",
                                "fits": [fit(1.0, 0.4, 0.98, 0.50, 2.0, [(0, 0, 0.6), (0.01, 2.0, 0.5)]),
                                         fit(0.8, 0.2, 0.90, 0.70, 0.0, [(0, 0, 0.7), (0.01, 3.0, 0.75)])]}  # fmt: skip
    plain = make_record("qwen25_coder_15b", "mka", 28, 21, {})
    plain["config_hash"] = "p"
    accuracy = pd.DataFrame([
        {"config_hash": h, "model": "qwen25_coder_15b", "quantizer": "none", "method": "mka",
         "variant": "", "layers_before": 28, "layers_after": 21, "removed": 7, "column": c}
        for h in ("r", "p") for c in ("mmlu acc_macro", "mmlu acc")])  # fmt: skip
    rows = repair_fits.fit_rows(accuracy, {"r": repaired, "p": plain})
    assert list(rows["config_hash"]) == ["r"]
    row = rows.iloc[0]
    assert row["fits"] == 2 and row["scales"] == [0, 0.01]
    assert row["residual_after"] == pytest.approx(0.3) and row["heldout_residual_after_max"] == 0.7
    assert row["heldout_least_squares"] == pytest.approx(0.65)
    table = repair_fits.fit_table(rows).iloc[0]
    assert table["fit tokens"] == "200,037" and table["held-out tokens"] == "20,010"
    assert table["held-out: before → after"] == "0.940 (0.900–0.980) → 0.600 (0.500–0.700)"
    assert table["held-out, least squares (s = 0)"] == "0.650 (0.600–0.700)"
    del repaired["repair_stats"]["fits"][1]
    for key in ("heldout_residual_before", "heldout_residual_after", "ridge_grid"):
        del repaired["repair_stats"]["fits"][0][key]  # fitted without held-out tokens
    table = repair_fits.fit_table(repair_fits.fit_rows(accuracy, {"r": repaired})).iloc[0]
    assert table["fit tokens: before → after"] == "1.000 → 0.400"
    assert table["held-out: before → after"] == "not measured"
