"""What a point leaves in its run directory beside its record: each matrix a method computed
(.npy and a heatmap PNG), and the summary table printed at its end."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_artifacts(
    artifacts: dict[str, Any], output_dir: Path, merges: list[dict] | None = None
) -> None:
    """Each matrix a method left behind, as .npy and as a heatmap PNG (paper Fig. 3), with the
    merged pairs (MKA's `merges`) marked."""
    import numpy as np

    from mka_exp.results.plots import merge_marks, similarity_heatmap

    output_dir.mkdir(parents=True, exist_ok=True)
    for name, matrix in artifacts.items():
        array = np.asarray(matrix)
        np.save(output_dir / f"{name}.npy", array)
        marks = merge_marks(name, array, merges)
        similarity_heatmap(array, output_dir / f"{name}.png", name.replace("_", " "), **marks)


def record_images(output_dir: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(output_dir.glob("*.png"))}


def is_mmlu_subject(key: str) -> bool:
    """`mmlu_anatomy/acc`, `mmlu_val_anatomy/acc`: one of 57 subjects, too many for the summary;
    the groups (`mmlu/...`, `mmlu_val/...`) stay."""
    return key.startswith("mmlu_") and not key.startswith("mmlu_val/")


def print_summary(record: dict[str, Any]) -> None:
    """The run's results as a small table on stdout."""
    import pandas as pd

    metrics = {k: v for k, v in record.get("metrics", {}).items() if "stderr" not in k}
    head = {
        "model": record["model"],
        "method": record["method"],
        "layers": f"{record['layers_before']}→{record['layers_after']}",
        "params": f"{record['params_before']:,}→{record['params_after']:,}",
        **{k: round(v, 4) for k, v in metrics.items() if not is_mmlu_subject(k)},
    }
    print(pd.DataFrame([head]).to_string(index=False))
