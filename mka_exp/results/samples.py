"""Per-example records: lm-eval's outcome for every evaluated example, kept beside the run record.

An aggregate accuracy cannot say whether two methods differ: a paired test needs to know which
examples each got right. lm-eval logs every example (`log_samples=True`); this module keeps the
part a paired comparison needs, one row per example and filter:

    task      our task name (`mmlu`, `piqa`, ...), the one the run asked for
    subtask   lm-eval's leaf task (for MMLU the subject, e.g. `mmlu_anatomy`; else = the task)
    doc_id    lm-eval's document index within the subtask
    doc_hash  the first 16 hex digits of lm-eval's sha256 of the document (pairing checks it)
    prompt_hash  the same of the prompt (few-shot examples included: equal only for one protocol)
    target    the gold answer as lm-eval logged it (an index for the multiple-choice tasks)
    pred      the answer with the highest log-likelihood (the choice `acc` scores)
    acc, acc_norm   lm-eval's per-example metrics (acc_norm null where the task has none)
    filter    lm-eval's filter name (`none` for the multiple-choice tasks)
    choice_ll   the log-likelihood of each choice, in the task's choice order: the values `acc`
              compares (lm-eval's `filtered_resps`, the `ll` of each `(ll, is_greedy)`; for a
              mutual-information task only the conditional ones). Null for other request types.
    choice_len  the length each choice's log-likelihood is divided by for `acc_norm`: lm-eval's
              `completion_len`, `len(choice)` of each string of `task.doc_to_choice(doc)` (Python
              characters, without the target delimiter), so `argmax(choice_ll / choice_len)` is
              acc_norm's pick. Null where no task was given to read the choices from.

Files written before the two choice columns existed read with both null.

The file is gzip'd JSON lines, `records/<config hash>.samples.jsonl.gz` under the records dir,
written atomically (temp file + `os.replace`, mode from the umask, gzip mtime 0 so equal content
gives an equal file), and the record holds `{"path": <relative to the records dir>, "sha256",
"rows", "examples_sha256"}`; `read_samples` checks the digest. `examples_sha256` names which
examples were evaluated (`examples_digest` of each subtask's doc_ids: with `eval.sample_seed` it
is the digest of the draw), so two records evaluated the same examples when it is equal.
`aggregate` recomputes the record's metrics from the rows: the mean per task, and for a group
(MMLU) lm-eval's size-weighted score (`acc`, the mean over all questions) and the macro average
over subjects (`acc_macro`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mka_exp.results.files import write_bytes_atomic
from mka_exp.results.table import writing

COLUMNS = ("task", "subtask", "doc_id", "doc_hash", "prompt_hash", "target", "pred")
COLUMNS += ("acc", "acc_norm", "filter", "choice_ll", "choice_len")
CHOICE_COLUMNS = ("choice_ll", "choice_len")
METRICS = ("acc", "acc_norm")
HASH_DIGITS = 16
SUFFIX = ".samples.jsonl.gz"


ChoicesOf = Callable[[dict[str, Any]], list[str]]


def from_lm_eval(
    results: dict[str, Any], owners: dict[str, str], choices: Mapping[str, ChoicesOf] | None = None
) -> pd.DataFrame:
    """Rows from lm-eval's `results["samples"]`; `owners` maps each leaf task to our task name,
    `choices` each leaf task to its `doc_to_choice` (for `choice_len`; none: null lengths)."""
    rows = []
    for subtask, logged in results.get("samples", {}).items():
        task, doc_to_choice = owners.get(subtask, subtask), (choices or {}).get(subtask)
        rows += [sample_row(task, subtask, sample, doc_to_choice) for sample in logged]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.sort_values(["task", "subtask", "filter", "doc_id"], ignore_index=True)


def sample_row(
    task: str, subtask: str, sample: dict[str, Any], doc_to_choice: ChoicesOf | None = None
) -> dict[str, Any]:
    lengths = choice_lengths(doc_to_choice, sample.get("doc"))
    lls = choice_lls(sample.get("filtered_resps"), lengths)
    return {
        "task": task,
        "subtask": subtask,
        "doc_id": int(sample["doc_id"]),
        "doc_hash": str(sample.get("doc_hash", ""))[:HASH_DIGITS],
        "prompt_hash": str(sample.get("prompt_hash", ""))[:HASH_DIGITS],
        "target": plain(sample.get("target")),
        "pred": int(np.argmax(lls)) if lls else None,  # lm-eval's `pred` for `acc`
        **{m: float(sample[m]) if m in sample else None for m in METRICS},
        "filter": sample.get("filter", "none"),
        "choice_ll": lls,
        "choice_len": lengths,
    }


def choice_lengths(doc_to_choice: ChoicesOf | None, doc: Any) -> list[int] | None:
    """lm-eval's `completion_len` for `acc_norm`: `len` of each choice string of the document."""
    if doc_to_choice is None or doc is None:
        return None
    choices = doc_to_choice(doc)
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        return None
    return [len(choice) for choice in choices]


def choice_lls(responses: Any, lengths: list[int] | None) -> list[float] | None:
    """The `ll` of each multiple-choice `(ll, is_greedy)` response, None for other request types.
    A mutual-information task appends one unconditional response per choice; with the choice
    count known only the conditional ones (what `acc` compares) are kept."""
    if not isinstance(responses, list | tuple) or not responses:
        return None
    if not all(isinstance(r, list | tuple) and r and is_number(r[0]) for r in responses):
        return None
    lls = [float(r[0]) for r in responses]
    return lls[: len(lengths)] if lengths else lls


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.floating) and not isinstance(value, bool)


def plain(value: Any) -> Any:
    """A JSON scalar for the gold answer (numpy ints, lists of golds)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, int | float | str) or value is None:
        return value
    return json.dumps(value, default=str)


def samples_path(records_dir: Path, key: str) -> Path:
    return Path(records_dir) / "records" / f"{key}{SUFFIX}"


def write_samples(records_dir: Path, key: str, frame: pd.DataFrame) -> dict[str, Any]:
    """Write the rows for config hash `key`; returns the reference the record keeps."""
    path = samples_path(records_dir, key)
    lines = (json.dumps(json_row(row), sort_keys=True) for row in frame.to_dict("records"))
    data = ("\n".join(lines) + "\n" if len(frame) else "").encode()
    blob = gzip.compress(data, mtime=0)
    with writing(records_dir):  # a kill mid-write leaves a temp the next writer clears
        write_bytes_atomic(path, blob)
    return {
        "path": path.relative_to(records_dir).as_posix(),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "rows": len(frame),
        "examples_sha256": examples_digest(frame.groupby("subtask")["doc_id"].agg(list).to_dict()),
    }


def examples_digest(doc_ids: Mapping[str, Iterable[int]]) -> str:
    """16 hex digits of sha256 over `{subtask: sorted distinct doc_ids}` as sorted JSON (for
    `evaluation.draw_examples`' output as for the rows of a file)."""
    plain_ids = {str(k): sorted({int(i) for i in v}) for k, v in doc_ids.items()}
    blob = json.dumps(plain_ids, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_DIGITS]


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (a metric the task lacks) as null; numpy scalars as Python ones."""
    out = {}
    for key, value in row.items():
        value = value.item() if isinstance(value, np.generic) else value
        out[key] = None if isinstance(value, float) and math.isnan(value) else value
    return out


class SamplesError(ValueError):
    """A record's per-example file is missing or does not match its digest."""


def read_samples(records_dir: Path, record: dict[str, Any]) -> pd.DataFrame | None:
    """The record's rows, None when the record has no per-example file (an older run)."""
    ref = record.get("samples")
    if not ref:
        return None
    path = Path(records_dir) / ref["path"]
    name = f"record {record.get('config_hash', '?')}: per-example file {path}"
    if not path.exists():
        raise SamplesError(f"{name} is missing")
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != ref.get("sha256"):
        raise SamplesError(f"{name} has sha256 {digest[:12]}…, the record says {ref.get('sha256')}")
    lines = gzip.decompress(blob).decode().splitlines()
    rows = [json.loads(line) for line in lines if line]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame[list(METRICS)] = frame[list(METRICS)].astype(float)
    for column in CHOICE_COLUMNS:  # lists per row; None in a file older than these columns
        frame[column] = pd.Series(
            [row.get(column) for row in rows], index=frame.index, dtype=object
        )
    return frame


def aggregate(frame: pd.DataFrame) -> dict[str, float]:
    """The record's metrics recomputed from the rows (`{"<task>/<metric>": value}`): each leaf's
    mean; for a task with several subtasks also the mean over all its examples (lm-eval's
    size-weighted group score) and `<metric>_macro`, the mean of the subtask means."""
    out: dict[str, float] = {}
    for (task, filt), rows in frame.groupby(["task", "filter"], sort=False):
        suffix = "" if filt == "none" else f",{filt}"
        for metric in METRICS:
            values = rows[["subtask", metric]].dropna()
            if values.empty:
                continue
            per_subtask = values.groupby("subtask")[metric].mean()
            for subtask, mean in per_subtask.items():
                out[f"{subtask}/{metric}{suffix}"] = float(mean)
            if len(per_subtask) > 1 or per_subtask.index[0] != task:
                out[f"{task}/{metric}{suffix}"] = float(values[metric].mean())
                out[f"{task}/{metric}_macro{suffix}"] = float(per_subtask.mean())
    return out
