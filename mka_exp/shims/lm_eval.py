"""lm-evaluation-harness workarounds: its logging and progress bars around an in-memory model,
and the documents it re-processes on every read.

lm-eval warns about an already-initialized model on every call (which is what we intend), can
warn once per request, and draws a progress bar per task; `quiet_lm_eval` keeps each kind of
warning once. `memoize_docs` keeps a built task's processed documents (lm-eval re-runs
`process_docs` over the whole split each time they are read). Floor 1: imports lm-eval, datasets
and tqdm, nothing of mka_exp.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from typing import Any

import datasets

log = logging.getLogger("mka_exp.evaluation.harness")  # its lines read as the evaluation's


# lm-eval warns about these on every call with an in-memory model, which is what we intend.
EXPECTED_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


def memoize_docs(task: Any) -> None:
    """lm-eval re-runs a task's `process_docs` over the whole split each time its documents are
    read (4 times per `evaluate`: ~9 s for HellaSwag's 10k at any limit); the documents of a
    built task never change, so keep the first result."""
    for name in ("training_docs", "validation_docs", "test_docs", "fewshot_docs"):
        method = getattr(task, name, None)
        if callable(method):
            setattr(task, name, functools.cache(method))


class DropRepeats(logging.Filter):
    """Drop lm-eval's expected in-memory-model warnings and repeats of a warning that differ only
    in numbers (e.g. one "context exceeds max length" line per request), counting the drops."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(EXPECTED_WARNINGS):
            return False
        kind = re.sub(r"\d+", "#", message)
        if kind in self.seen:
            self.dropped += 1
            return False
        self.seen.add(kind)
        return True


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs INFO per task, can warn per request and draws a progress bar per task; keep
    each kind of warning once, one bar for the model calls, and no `datasets` map bars."""
    import lm_eval.api.task as lm_task
    from tqdm import tqdm

    root = logging.getLogger("lm_eval")
    level = root.level
    loggers = [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n == "lm_eval" or n.startswith("lm_eval.")
    ]
    dedup = DropRepeats()
    bars_on = datasets.is_progress_bar_enabled()
    task_tqdm = lm_task.tqdm
    if level == logging.NOTSET or level < logging.WARNING:
        root.setLevel(logging.WARNING)
    for logger in loggers:
        logger.addFilter(dedup)
    datasets.disable_progress_bars()
    lm_task.tqdm = functools.partial(tqdm, disable=True)  # the per-task "building contexts" bar
    try:
        yield
    finally:
        lm_task.tqdm = task_tqdm
        if bars_on:
            datasets.enable_progress_bars()
        for logger in loggers:
            logger.removeFilter(dedup)
        root.setLevel(level)
        if dedup.dropped:
            log.warning("%d repeats of lm-eval warnings shown above were dropped", dedup.dropped)


def task_config(task_manager: Any, name: str) -> dict[str, Any]:
    """lm-eval's full config of a task it indexed from a yaml (its `include` resolved, its
    `!function`s imported), as its factory reads it before building the task; a fresh copy."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index[name]
    return load_yaml(entry.yaml_path, resolve_func=True)


def register_tasks(task_manager: Any, configs: list[dict[str, Any]]) -> None:
    """Add tasks and groups given as config dicts to a built `TaskManager`'s index, as if read
    from yaml files under its `include_path` (lm-eval 0.4.13 has no public call that adds to a
    built index; its own inline-dict path namespaces the names as `group::task`)."""
    from lm_eval.tasks._index import Kind, TaskIndex

    index = task_manager.task_index
    for config in configs:
        entry = TaskIndex.entry_from_config(config)
        index[entry.name] = entry
    kinds = {kind: sorted(n for n, e in index.items() if e.kind in kind)
             for kind in ((Kind.TASK, Kind.PY_TASK), (Kind.GROUP,))}  # fmt: skip
    task_manager._all_tasks = sorted(index)
    task_manager._all_subtasks = kinds[(Kind.TASK, Kind.PY_TASK)]
    task_manager._all_groups = kinds[(Kind.GROUP,)]
