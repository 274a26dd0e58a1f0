"""Calibration prompts: MMLU questions (leak-free validation by default, or the paper's first test
question per subject) or any text dataset (hub id or local file), tokenized once. `seed` null takes
the first rows (the paper's draw); an integer draws the rows at random (calibration sensitivity).

Builders take plain arguments and return a :class:`CalibrationSet`, which layer methods read as
padded batches and llm-compressor reads as a `datasets.Dataset`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mka_exp.data import MMLU_SUBJECTS, load_split, read_jsonl


@dataclass
class CalibrationSet:
    """Right-padded token ids of the calibration prompts (padding excluded by `attention_mask`)."""

    name: str
    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    batch_size: int = 8

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        size = batch_size or self.batch_size
        for start in range(0, len(self), size):
            yield {
                "input_ids": self.input_ids[start : start + size],
                "attention_mask": self.attention_mask[start : start + size],
            }

    def to_dataset(self):
        """Unpadded rows for llm-compressor's `oneshot(dataset=...)`."""
        from datasets import Dataset

        rows = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(self.input_ids, self.attention_mask, strict=True)
        ]
        return Dataset.from_dict(
            {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        )

    def fingerprint(self) -> str:
        """Stable key of the exact token ids: caches of activations are keyed by it."""
        digest = hashlib.sha256(self.input_ids.numpy().tobytes())
        digest.update(self.attention_mask.numpy().tobytes())
        return digest.hexdigest()[:16]


def tokenize(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    name: str,
    batch_size: int,
) -> CalibrationSet:
    if not texts:
        raise ValueError(f"calibration set {name!r} is empty")
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # positions must line up for the per-token statistics
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    tokenizer.padding_side = side
    return CalibrationSet(name, texts, enc["input_ids"], enc["attention_mask"], batch_size)


def format_mmlu(doc: dict) -> str:
    """The question as lm-eval's MMLU prompt shows it, with its answer."""
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(doc["choices"]))
    return f"{doc['question'].strip()}\n{options}\nAnswer: {letters[int(doc['answer'])]}"


def check_seed(seed: object) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(
            f"calib.seed={seed!r} is not allowed; allowed: null (the first rows) or an integer"
        )
    return seed


def draw(items: list, count: int, seed: int | None, stream: str = "") -> list:
    """The first `count` items (seed null: the paper's and today's draw), else `count` drawn at
    random without replacement, in their original order. Each `stream` (an MMLU subject) has its
    own generator seeded by text, so a subject's draw depends only on the seed and the subject."""
    if seed is None or count >= len(items):
        return items[:count]
    picked = random.Random(f"{seed}/{stream}").sample(range(len(items)), count)
    return [items[i] for i in sorted(picked)]


def seed_label(seed: int | None) -> str:
    return "" if seed is None else f"_seed{seed}"


def mmlu_prompts(
    tokenizer: PreTrainedTokenizerBase,
    split: str = "validation",
    per_subject: int = 1,
    max_length: int = 512,
    batch_size: int = 8,
    data_root: str | None = None,
    seed: int | None = None,
) -> CalibrationSet:
    """`per_subject` questions from each of the 57 MMLU subjects: the first rows of `split`, or
    with `seed` a random draw of rows per subject."""
    allowed = ("dev", "validation", "test")
    if split not in allowed:
        raise ValueError(f"calib.split={split!r} is not an MMLU split; allowed: {allowed}")
    if per_subject < 1:
        raise ValueError(f"calib.per_subject={per_subject} must be >= 1")
    check_seed(seed)
    texts = []
    for subject in MMLU_SUBJECTS:
        rows = load_split("cais/mmlu", subject, split, data_root)
        texts += [format_mmlu(row) for row in draw(rows, per_subject, seed, subject)]
    name = f"mmlu_{split}_{per_subject}{seed_label(seed)}"
    return tokenize(texts, tokenizer, max_length, name, batch_size)


def text_dataset(
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    name: str | None = None,
    split: str = "train",
    field: str = "text",
    num_samples: int = 128,
    max_length: int = 512,
    batch_size: int = 8,
    data_root: str | None = None,
    seed: int | None = None,
) -> CalibrationSet:
    """The first `num_samples` non-empty `field` values of a hub dataset or a local .jsonl/.txt
    (with `seed`: `num_samples` of them drawn at random)."""
    check_seed(seed)
    local = Path(path).expanduser()
    if local.suffix in (".jsonl", ".txt", ".json"):
        if not local.exists():
            raise FileNotFoundError(f"calib.path={path!r} does not exist")
        if local.suffix == ".txt":
            texts = local.read_text().splitlines()
        else:  # a bad line or a row without `field` is named, not a bare JSON/KeyError
            rows = read_jsonl(local)
            lacking = next((n for n, row in enumerate(rows, 1) if field not in row), None)
            if lacking:
                msg = f"calib.field={field!r}: row {lacking} of {local} has no such field"
                raise ValueError(msg)
            texts = [row[field] for row in rows]
    else:
        texts = [row[field] for row in load_split(path, name, split, data_root)]
    texts = draw([t for t in texts if t and t.strip()], num_samples, seed)
    label = f"{local.stem if local.suffix else path}_{split}_{len(texts)}{seed_label(seed)}"
    return tokenize(texts, tokenizer, max_length, label, batch_size)
