"""Tasks derived from lm-eval's own: `mmlu_val`, MMLU's 57 subject tasks read from the
*validation* split (few-shot examples from `dev`, as lm-eval's MMLU), named `mmlu_val_<subject>`.

Why: a choice made before a test (issue 28: the "best" pruning method) must be made on questions
the test never asks; MMLU's validation split (1,531 questions) is disjoint from its test split.
Why derived rather than written out: each subject's config is lm-eval's own `mmlu_<subject>`
(its template included), with only the split and the names changed, so the prompt, choices,
metric and few-shot rule stay lm-eval's and a validation score reads like a test score. The
offline mirror serves `cais/mmlu/<subject>/validation.jsonl` like the test files.

May import: `data` (the subject list) and `shims.lm_eval` (adding configs to lm-eval's index).
"""

from __future__ import annotations

from typing import Any

from mka_exp.data import MMLU_SUBJECTS
from mka_exp.shims.lm_eval import register_tasks, task_config

VALIDATION_GROUP = "mmlu_val"
VALIDATION_SPLIT = "validation"


def mmlu_val_configs(task_manager: Any) -> list[dict[str, Any]]:
    """The 57 subject configs (lm-eval's `mmlu_<subject>` read from the validation split) and
    their group, which weights subjects by size like lm-eval's `mmlu` (our macro average is
    added by `harness.flatten_results`)."""
    subjects = []
    for subject in MMLU_SUBJECTS:
        config = task_config(task_manager, f"mmlu_{subject}")
        config.pop("tag", None)  # lm-eval's category tags would pull these into its `mmlu` groups
        config |= {"task": f"{VALIDATION_GROUP}_{subject}", "test_split": VALIDATION_SPLIT}
        subjects.append(config)
    group = {
        "group": VALIDATION_GROUP,
        "task": [config["task"] for config in subjects],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 1, "derived_from": "mmlu", "test_split": VALIDATION_SPLIT},
    }
    return [*subjects, group]


def add_derived_tasks(task_manager: Any) -> None:
    """Make `mmlu_val` (and its subjects) known to lm-eval's task manager."""
    register_tasks(task_manager, mmlu_val_configs(task_manager))
