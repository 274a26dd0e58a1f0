"""`python -m mka_exp.report`: tables put the paper's numbers beside ours, plots and heatmaps
render, bad input fails with one line naming the path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mka_exp import report, results

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
    make_record("llama3_8b", "mka", 32, 18, five(0.60, 0.55, 0.50, 0.40, 0.62), lambda_mode="code"),
    make_record("llama3_8b", "mka", 32, 18, {"mmlu/acc_macro": 0.58}, lambda_mode="paper"),
    make_record("llama3_8b", "reverse_prune", 32, 28, {"mmlu/acc": 0.655}),
    make_record("llama3_8b", "sparsegpt", 32, 32, five(0.45, 0.6, 0.3, 0.3, 0.5), sparsity=0.34375),
    make_record(
        "llama3_8b", "mka", 32, 18, {"mmlu/acc_macro": 0.61}, "gptq", 4, lambda_mode="code"
    ),
    make_record("llama3_8b", "mka", 32, 18, {"mmlu/acc_macro": 0.62}, "smoothquant", 8),
    make_record("smollm2_135m", "reverse_prune", 30, 27, {"piqa/acc": 0.6, "mmlu/acc": 0.3}),
    make_record("smollm2_135m", "reverse_prune", 30, 24, {"piqa/acc": 0.55, "mmlu/acc": 0.27}),
]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """An outputs dir: records + results.csv, and two run dirs with similarity matrices."""
    root = tmp_path_factory.mktemp("outputs")
    for record in RECORDS:
        results.save_record(root, record)
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
        assert report.main([str(outputs)]) == 0
    return outputs / "report", stdout.getvalue()


def row(table: pd.DataFrame, **match: object) -> pd.Series:
    hits = table
    for key, value in match.items():
        hits = hits[hits[key].fillna("") == value]
    assert len(hits) == 1, f"{match}: {len(hits)} rows\n{table}"
    return hits.iloc[0]


def test_paper_file_ships_and_maps_names():
    paper = report.load_paper()
    assert len(paper) == 182
    assert set(paper["model"]) == {"llama3_8b", "mistral_7b", "llama2_7b", "llama2_13b"}
    assert set(paper["task"]) == set(report.TASKS)
    assert set(paper["method"]) <= set(report.PAPER_METHODS)


def test_table_3_4_puts_paper_mmlu_beside_ours(built):
    out, _ = built
    table = pd.read_csv(out / "table3_4.csv")
    mka = row(table, model="llama3_8b", method="mka", variant="lambda_mode=code")
    assert (mka["layers_after"], mka["compression_ratio"]) == (18, 0.4375)
    assert mka["mmlu"] == 60.0 and mka["mmlu_paper"] == 64.42  # paper Table 3, 18 layers
    assert row(table, method="mka", variant="lambda_mode=paper")["mmlu"] == 58.0
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
    assert np.isnan(row(table, method="mka", variant="lambda_mode=code")["piqa_paper"])


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
    assert "| llama3_8b | mka | lambda_mode=code | 32 | 18 | 0.4375 | 60.00 | 64.42 |" in printed
    index = (out / "report.md").read_text()
    assert "table2.csv" in index and "plots/curve_llama3_8b_mmlu.png" in index
    assert "heatmaps/" in index


def test_plots_and_heatmaps_are_pngs(built):
    out, _ = built
    curves = sorted(p.name for p in (out / "plots").glob("*.png"))
    expected = [f"curve_llama3_8b_{t}.png" for t in ("boolq", "hellaswag", "mmlu", "piqa", "race")]
    assert curves == sorted(
        expected + ["curve_smollm2_135m_mmlu.png", "curve_smollm2_135m_piqa.png"]
    )
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
        assert report.main([str(outputs / "results.csv"), "--out", str(tmp_path), "--wandb"]) == 0
    assert (tmp_path / "report.md").exists()
    table = pd.read_csv(tmp_path / "table3_4.csv")
    mka = table[(table["method"] == "mka") & (table["mmlu"] == 60.0)].iloc[0]
    assert mka["variant"].startswith("#") and mka["mmlu_paper"] == 64.42  # hash tells runs apart


def test_wandb_disabled_mode_logs_without_error(built, monkeypatch, recwarn):
    out, _ = built
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in ("table1", "table2", "table3_4")}
    plots = sorted((out / "plots").glob("*.png"))[:2]
    report.log_to_wandb(report.Report(out=out, tables=tables, plots=plots))
    assert not [w for w in recwarn if "wandb logging failed" in str(w.message)]


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "empty_csv"])
def test_bad_input_is_one_line_naming_the_path(kind, tmp_path, capsys):
    path = tmp_path / "nothing"
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "empty_csv":
        path = tmp_path / "results.csv"
        path.write_text("")
    assert report.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err
