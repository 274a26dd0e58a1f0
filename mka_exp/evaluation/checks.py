"""Evaluation's own checks of its settings, run before the model loads: each bad value is one
line naming the key, the value and what is allowed (`mka_exp.checks.gather` reports them all).

Reading the benchmark files is the one costly check (`check_eval_data`): it builds the lm-eval
tasks, which read every file they use; the built tasks are kept for the evaluation
(`harness.built_tasks`), so nothing is read twice.
"""

from __future__ import annotations

from typing import Any

from mka_exp.checks import gather, is_int, is_number


def check_limit(limit: Any) -> None:
    if limit is None:
        return
    allowed = "an int > 0 (examples per task), a float in (0, 1] (a fraction) or null (all)"
    if not is_number(limit) or not limit > 0 or (isinstance(limit, float) and limit > 1):
        raise ValueError(f"eval.limit={limit!r}: allowed {allowed}")


def check_batch_size(batch_size: Any) -> None:
    """An int >= 1, `auto` or lm-eval's `auto:N` (N re-searches of the largest size)."""
    text = batch_size if isinstance(batch_size, str) else ""
    auto = text == "auto" or (text.startswith("auto:") and text[5:].isdigit())
    if auto or (is_int(batch_size) and batch_size >= 1):
        return
    raise ValueError(f"eval.batch_size={batch_size!r}: allowed an integer >= 1, auto or auto:N")


def check_task_list(tasks: Any) -> None:
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(
            f"eval.tasks={tasks!r}: allowed a list of lm-eval task names, e.g. "
            "eval.tasks=[piqa,hellaswag], or [] for no evaluation"
        )


def check_fewshot(num_fewshot: Any) -> None:
    """Shot counts per task (names are checked with the tasks, in `check_eval_data`)."""
    if num_fewshot is None:
        return
    if not isinstance(num_fewshot, dict):
        raise ValueError(
            f"eval.num_fewshot={num_fewshot!r}: allowed a mapping task: shots, "
            "e.g. eval.num_fewshot={mmlu:5}"
        )
    for task, shots in num_fewshot.items():
        if not is_int(shots) or shots < 0:
            raise ValueError(f"eval.num_fewshot.{task}={shots!r}: allowed an integer >= 0")


def check_eval(tasks: Any, limit: Any, batch_size: Any, num_fewshot: Any) -> None:
    gather(
        lambda: check_task_list(tasks),
        lambda: check_limit(limit),
        lambda: check_batch_size(batch_size),
        lambda: check_fewshot(num_fewshot),
    )


def check_eval_data(
    tasks: list[str], num_fewshot: dict[str, int] | None, data_root: str | None, seed: int = 1234
) -> None:
    """Task names (with close matches), few-shot names, and every data file the tasks read:
    builds the tasks now, as the evaluation will (and then reuses them)."""
    if not tasks:
        return
    from mka_exp.data import offline_datasets
    from mka_exp.evaluation.harness import (
        built_tasks,
        quiet_lm_eval,
        resolve_fewshot,
        resolve_tasks,
        task_objects,
    )

    names = list(resolve_tasks(list(tasks)))
    shots = resolve_fewshot(num_fewshot or {}, names)
    with quiet_lm_eval(), offline_datasets(data_root):
        task_dict = built_tasks(names, shots, seed, data_root)
        empty = [task.task_name for task in task_objects(task_dict) if lacks_shots(task)]
    if empty:
        raise ValueError(
            f"eval.num_fewshot asks for examples from {', '.join(empty[:3])}"
            f"{' ...' if len(empty) > 3 else ''}, whose few-shot split is empty "
            f"(data_root={data_root}); allowed: 0 shots for those tasks"
        )


def lacks_shots(task: Any) -> bool:
    """The task wants few-shot examples but its few-shot pool is empty (lm-eval would assert)."""
    if not task.get_config("num_fewshot"):
        return False
    try:
        docs = task.fewshot_docs()
    except (KeyError, ValueError, AttributeError):
        return True
    return docs is None or len(docs) == 0
