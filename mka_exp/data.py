"""Hub datasets, or their offline mirrors laid out as `<root>/<org>/<name>/<config>/<split>.jsonl`
(`<config>` is `default` where the hub dataset has none) with the hub's field names.

`offline_datasets(root)` routes every `datasets.load_dataset(path, name)` call whose dataset is
mirrored under `root` to the local files, so lm-eval's own task YAMLs (prompts, splits, metrics)
run unchanged on air-gapped machines: only where the data comes from changes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import datasets

MMLU_SUBJECTS = [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
]


def check_data_root(data_root: str | None) -> Path | None:
    if data_root is None:
        return None
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_root={data_root!r} is not a directory")
    return root


def mirror_dir(root: Path, path: str, name: str | None) -> Path:
    return root / path / (name or "default")


def read_jsonl(file: Path) -> list[dict]:
    """The rows of a .jsonl file; a bad line is named by file and line number (blanks count)."""
    rows = []
    with open(file) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                msg = f"{file}:{number}: not valid JSON at column {err.colno} ({err.msg})"
                raise ValueError(msg) from None
    return rows


def load_split(path: str, name: str | None, split: str, data_root: str | None) -> list[dict]:
    """Rows of one split, from the mirror when `data_root` is set, else from the hub."""
    root = check_data_root(data_root)
    if root is None:
        return list(datasets.load_dataset(path, name, split=split))
    file = mirror_dir(root, path, name) / f"{split}.jsonl"
    if not file.exists():
        raise FileNotFoundError(f"{path} ({name or 'default'}) split {split!r}: missing {file}")
    return read_jsonl(file)


class MissingSplit(FileNotFoundError, KeyError):
    """A user error (one line) that code probing a split with `except KeyError` still catches."""


class MirroredSplits(datasets.DatasetDict):
    """The splits of one mirrored dataset; asking for a split it lacks names the missing file
    (lm-eval indexes the split its task config names: a bare KeyError 'validation' otherwise)."""

    path: str = ""
    folder: Path = Path()

    def __missing__(self, split: str):
        raise MissingSplit(
            f"split {split!r} of {self.path!r} is not in the mirror: no {self.folder}/{split}.jsonl"
            f" (splits there: {', '.join(sorted(self)) or 'none'})"
        )


def load_mirrored(root: Path, path: str, name: str | None) -> datasets.DatasetDict:
    """Every split present in the mirror, as the DatasetDict `load_dataset` would return."""
    folder = mirror_dir(root, path, name)
    files = {f.stem: str(f) for f in sorted(folder.glob("*.jsonl"))}
    if not files:
        raise FileNotFoundError(f"{path} ({name or 'default'}) has no *.jsonl in {folder}")
    splits = MirroredSplits(
        {split: datasets.Dataset.from_list(read_jsonl(Path(f))) for split, f in files.items()}
    )
    splits.path, splits.folder = path, folder
    return splits


def with_empty_train(dd: datasets.DatasetDict) -> datasets.DatasetDict:
    """Add an empty `train` split (same features) where the mirror has none.

    lm-eval builds each task's few-shot pool from `train` when the task is created, even at
    0-shot, so piqa/hellaswag/boolq would fail with KeyError 'train' without it; asking such a
    task for shots then fails in lm-eval's sampler ("no documents available for sampling").
    """
    if "train" not in dd:
        dd["train"] = next(iter(dd.values())).select([])
    return dd


@contextlib.contextmanager
def offline_datasets(data_root: str | None) -> Iterator[None]:
    """Within the block, `datasets.load_dataset` reads mirrored datasets from `data_root`.

    Datasets not in the mirror fall through to the real `load_dataset`, so a partial mirror works.
    """
    root = check_data_root(data_root)
    if root is None:
        yield
        return
    real = datasets.load_dataset

    def routed(path, name=None, *args, **kwargs):
        if isinstance(path, str) and (root / path).is_dir():
            dd = load_mirrored(root, path, name)
            split = kwargs.get("split")
            return dd[split] if split else with_empty_train(dd)
        try:
            return real(path, name, *args, **kwargs)
        except OSError as err:  # ConnectionError (offline, no network) is an OSError
            raise FileNotFoundError(
                f"dataset {path!r} is not in data_root={root} (no folder {root / path}) and the "
                f"hub gave: {err}; add it to the mirror, or run without data_root"
            ) from None

    datasets.load_dataset = routed
    try:
        yield
    finally:
        datasets.load_dataset = real
