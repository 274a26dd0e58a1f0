"""Calibration prompts: MMLU questions (leak-free validation by default, or the paper's first test
question per subject), any text dataset (hub id or local file), or general-text passages of
benchmark rows no evaluation reaches, with a held-out part (`hellaswag_passages`), tokenized once. `seed` null takes
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
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mka_exp.checks import MISSING_HINTS, check_positive, check_seed, gather
from mka_exp.data import MMLU_SUBJECTS, check_data_root, load_split, mirror_dir, read_jsonl


@dataclass
class CalibrationSet:
    """Right-padded token ids of the calibration prompts (padding excluded by `attention_mask`)."""

    name: str
    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    batch_size: int = 8
    heldout: CalibrationSet | None = None  # prompts a fit must never see (its held-out check)

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
    check_seed("calib.seed", seed, null="the first rows")
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
    check_seed("calib.seed", seed, null="the first rows")
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


# HellaSwag's validation split (MIT licence; 10,042 rows in the offline mirror) as general text:
# each row's context followed by its gold ending. Evaluations here read its first rows (lm-eval's
# `limit`), so passages start at `start_row` and `check_passages_unevaluated` refuses any
# evaluation that could reach them.
PASSAGES = ("Rowan/hellaswag", None, "validation")
PASSAGE_TASK = "hellaswag"


def hellaswag_passage(row: dict) -> str:
    return f"{row['ctx'].strip()} {row['endings'][int(row['label'])].strip()}"


def _lengths(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[int]:
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [len(row) for row in ids]


def _take(order: list[int], lengths: list[int], tokens: int) -> list[int]:
    """The first indices of `order` whose lengths add up to at least `tokens`."""
    taken, total = [], 0
    for index in order:
        if total >= tokens:
            break
        taken.append(index)
        total += lengths[index]
    return taken if total >= tokens else []


def _by_length(texts: list[str], tokenizer, max_length: int, name: str, batch_size: int):
    # Shortest first: a batch pads to its longest prompt, and a fit's sums do not depend on order.
    lengths = _lengths(texts, tokenizer, max_length)
    ordered = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    return tokenize(ordered, tokenizer, max_length, name, batch_size)


def hellaswag_passages(
    tokenizer: PreTrainedTokenizerBase,
    start_row: int = 1000,
    num_tokens: int = 200_000,
    heldout_tokens: int = 20_000,
    max_length: int = 256,
    batch_size: int = 16,
    data_root: str | None = None,
    seed: int | None = None,
) -> CalibrationSet:
    """Fit passages of at least `num_tokens` tokens (the model's tokenizer) from rows `start_row`
    on (seed null: in order; an integer: drawn at random), and a held-out part of at least
    `heldout_tokens` from the last rows, the same for every fit size. Each part is ordered by
    length."""
    check_seed("calib.seed", seed, null="the first rows")
    rows = load_split(*PASSAGES, data_root)
    texts = [hellaswag_passage(row) for row in rows]
    lengths = _lengths(texts, tokenizer, max_length)
    held = _take(list(range(len(texts) - 1, start_row - 1, -1)), lengths, heldout_tokens)
    pool = list(range(start_row, min(held, default=len(texts))))
    if seed is not None:
        random.Random(seed).shuffle(pool)
    fit = sorted(_take(pool, lengths, num_tokens))
    if not held or not fit:
        raise ValueError(
            f"calib.num_tokens={num_tokens} + calib.heldout_tokens={heldout_tokens}: rows "
            f"{start_row}..{len(texts) - 1} of {PASSAGES[0]} hold only {sum(lengths[start_row:])} "
            "tokens; ask for fewer or lower calib.start_row"
        )
    label = f"hellaswag_passages_{start_row}_{sum(lengths[i] for i in fit)}{seed_label(seed)}"
    calib = _by_length([texts[i] for i in fit], tokenizer, max_length, label, batch_size)
    heldout = [texts[i] for i in sorted(held)]
    calib.heldout = _by_length(heldout, tokenizer, max_length, f"{label}_heldout", batch_size)
    return calib


def check_passages_unevaluated(
    tasks: list, limit: object, sample_seed: object, start_row: int
) -> None:
    """Refuse an evaluation of the passages' task that could read a row >= `start_row`: all
    rows (null), a fraction, a larger limit, or a seeded draw (from anywhere in the split)."""
    if PASSAGE_TASK not in (tasks or []):
        return
    first_rows = isinstance(limit, int) and not isinstance(limit, bool) and limit <= start_row
    if first_rows and sample_seed is None:
        return
    key, value = ("eval.sample_seed", sample_seed) if first_rows else ("eval.limit", limit)
    raise ValueError(
        f"{key}={value!r}: calib=hellaswag_passages fits on {PASSAGE_TASK} rows from "
        f"calib.start_row={start_row} on, and this evaluation of {PASSAGE_TASK} could read them; "
        f"allowed: eval.limit an integer <= {start_row} with eval.sample_seed null"
    )


def check_against_eval(calib: dict, ev: dict) -> None:
    """The calibration source's own check against the evaluation (settings as plain dicts)."""
    if str(calib.get("_target_", "")).endswith(".hellaswag_passages"):
        start = calib.get("start_row", 1000)
        check_passages_unevaluated(ev.get("tasks"), ev.get("limit"), ev.get("sample_seed"), start)


# --- settings checks (before the model loads; `preflight.check_config`) ----------------------

LOCAL_TEXT = (".jsonl", ".json", ".txt")  # calib.path suffixes read as local files


MMLU_SPLITS = ("dev", "validation", "test")


def check_calibration(builder: str, settings: dict[str, Any]) -> None:
    """The settings of calibration builder `builder` (a `mka_exp.calibration` function name),
    with that function's defaults for keys not given; other builders check themselves."""
    import inspect

    check = CALIBRATION_CHECKS.get(builder)
    if check is None:
        return
    defaults = inspect.signature(globals()[builder]).parameters
    given = {name: settings.get(name, defaults[name].default) for name in defaults}
    check(**{name: given[name] for name in inspect.signature(check).parameters})


def check_mmlu_prompts(
    split: Any, per_subject: Any, max_length: Any, batch_size: Any, data_root: str | None
) -> None:
    """`calibration.mmlu_prompts`' settings, and the mirror's MMLU files when reading one."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"calib.split={split!r}: allowed {', '.join(MMLU_SPLITS)}")
    gather(
        lambda: check_positive("calib.per_subject", per_subject),
        lambda: check_positive("calib.max_length", max_length),
        lambda: check_positive("calib.batch_size", batch_size),
    )
    root = check_data_root(data_root)
    if root is not None:
        for subject in MMLU_SUBJECTS:
            file = mirror_dir(root, "cais/mmlu", subject) / f"{split}.jsonl"
            if not file.exists():
                raise FileNotFoundError(f"calib.split={split!r}: the mirror lacks {file}")
            read_jsonl(file)


def check_text_dataset(
    path: Any,
    field: Any,
    num_samples: Any,
    max_length: Any,
    batch_size: Any,
) -> None:
    """`calibration.text_dataset`'s settings; a local file must exist, parse and have `field`."""
    gather(
        lambda: check_positive("calib.num_samples", num_samples),
        lambda: check_positive("calib.max_length", max_length),
        lambda: check_positive("calib.batch_size", batch_size),
    )
    if not isinstance(path, str) or not path:
        raise ValueError(f"calib.path={path!r}: allowed {MISSING_HINTS['calib.path']}")
    local = Path(path).expanduser()
    if local.suffix not in LOCAL_TEXT:
        return  # a hub dataset (or its mirror), read by `data.load_split`
    if not local.is_file():
        raise FileNotFoundError(f"calib.path={path!r}: no such file")
    if local.suffix != ".txt":
        for number, row in enumerate(read_jsonl(local), 1):
            if not isinstance(row, dict) or field not in row:
                raise ValueError(
                    f"calib.field={field!r}: row {number} of {local} has no such field "
                    f"(fields: {', '.join(row) if isinstance(row, dict) else type(row).__name__})"
                )


CALIBRATION_CHECKS = {"mmlu_prompts": check_mmlu_prompts, "text_dataset": check_text_dataset}
