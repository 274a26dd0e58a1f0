"""Per-example rows: lm-eval's logged samples turned into the rows a run keeps.

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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ("task", "subtask", "doc_id", "doc_hash", "prompt_hash", "target", "pred")
COLUMNS += ("acc", "acc_norm", "filter", "choice_ll", "choice_len")
CHOICE_COLUMNS = ("choice_ll", "choice_len")
METRICS = ("acc", "acc_norm")
HASH_DIGITS = 16


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
