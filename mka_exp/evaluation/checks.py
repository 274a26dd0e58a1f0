"""Evaluation's own checks of its settings, run before the model loads: each bad value is one
line naming the key, the value and what is allowed (`mka_exp.checks.gather` reports them all).

Reading the benchmark files is the one costly check (`check_eval_data`): it builds the lm-eval
tasks, which read every file they use; the built tasks are kept for the evaluation
(`harness.built_tasks`), so nothing is read twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mka_exp.checks import check_positive, check_seed, gather, is_int, is_number
from mka_exp.state_store import check_settings


def check_limit(limit: Any) -> int | float | None:
    """The limit as lm-eval should get it: lm-eval reads a float < 1 as a fraction and anything
    else as a count, so 1.0 (all) becomes None rather than "1 example"."""
    if limit is None:
        return None
    allowed = "an int > 0 (examples per task), a float in (0, 1] (a fraction) or null (all)"
    if not is_number(limit) or not limit > 0 or (isinstance(limit, float) and limit > 1):
        raise ValueError(f"eval.limit={limit!r}: allowed {allowed}")
    return None if limit == 1.0 and isinstance(limit, float) else limit


def check_sample_seed(sample_seed: Any, limit: Any) -> None:
    """A seed is an int >= 0 and draws `limit` examples, so it needs `limit` as a count."""
    check_seed("eval.sample_seed", sample_seed, null="the first eval.limit examples per task")
    if sample_seed is not None and not is_int(limit):
        raise ValueError(
            f"eval.sample_seed={sample_seed} draws eval.limit examples per task, but "
            f"eval.limit={limit!r}; allowed: an int eval.limit (examples per task) or "
            "sample_seed=null"
        )


def check_prefix_cache(cache_tokens: Any, min_shared: Any) -> None:
    """The prefix cache's bounds (`prefix_cache.PrefixCacheHFLM`), both reported."""
    gather(
        lambda: check_positive("eval.prefix_cache_tokens", cache_tokens),
        lambda: check_positive("eval.prefix_min_shared", min_shared),
    )


def check_reuse(reuse: Any, layers: Any, max_bytes: Any, share_prefix: Any) -> None:
    """Reuse across models (`evaluation.reuse`): the store's settings (`state_store`), and the
    prefix cache it rides on."""

    def on_the_tree() -> None:
        if reuse is not None and reuse is not False and share_prefix is not True:
            raise ValueError(f"eval.reuse={reuse!r} needs eval.share_prefix=true (it reuses the "
                             f"prefix cache's tree), got {share_prefix!r}")  # fmt: skip

    check_settings("eval", reuse, layers, max_bytes, on_the_tree)


def check_answer_cache(directory: Any) -> None:
    """Null, or a directory path (made when missing) that is not an existing file."""
    if directory is None:
        return
    if not isinstance(directory, str) or not directory or Path(directory).is_file():
        raise ValueError(f"eval.answer_cache={directory!r}: allowed null (off) or a directory "
                         "path, where each model's answers are kept as they come")  # fmt: skip


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


def check_eval_data(
    tasks: list[str], num_fewshot: dict[str, int] | None, data_root: str | None, seed: int = 1234
) -> None:
    """Task names (with close matches), few-shot names, and every data file the tasks read:
    builds the tasks now, as the evaluation will (and then reuses them)."""
    if not tasks:
        return
    from mka_exp.data import offline_datasets
    from mka_exp.evaluation.harness import built_tasks, resolve_fewshot, resolve_tasks, task_objects
    from mka_exp.shims.lm_eval import quiet_lm_eval

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
