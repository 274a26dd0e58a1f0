"""lm-evaluation-harness's own tasks (prompts, splits, metrics) for any backend: resolving and
building tasks, drawing examples, flattening results (`backend.LMEvalBackend` runs them).

Why this shape:
- Tasks are built by lm-eval's `TaskManager` inside `offline_datasets(data_root)`, so the same
  task YAMLs read the offline mirror instead of the hub; only where the data comes from changes.
- Few-shot counts are per task (the paper's MMLU is 5-shot, the rest 0-shot), which lm-eval's
  `simple_evaluate` cannot do, so tasks are loaded here and run with `evaluator.evaluate`
  (that also skips `simple_evaluate`'s ~3 s environment report per call).
- Which examples: lm-eval's `limit` (each task's first N), or with `sample_seed` a seeded draw
  of N per leaf task handed to lm-eval as explicit indices (`evaluate(samples=...)`), so lm-eval
  itself selects, logs and hashes them.
- Results come back as one flat `{"<task>/<metric>": float}` dict for run records and wandb;
  for a group (MMLU) both lm-eval's size-weighted score and the macro average over its
  subtasks (`mmlu/acc_macro`, as the paper's script averaged per subject).

Nothing here reads Hydra config or knows which engine scores the requests.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mka_exp.choices import did_you_mean
from mka_exp.evaluation.derived import add_derived_tasks
from mka_exp.shims.lm_eval import memoize_docs

log = logging.getLogger(__name__)

# Our task names -> lm-eval task names. Any other lm-eval task/group/tag name passes through.
TASK_ALIASES: dict[str, str] = {
    "mmlu": "mmlu",  # group of 57 subjects, weighted by size in lm-eval's score
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "race": "race",  # lm-eval's `race` is EleutherAI/race, config `high` (RACE-high)
    "boolq": "boolq",  # SuperGLUE BoolQ
    "mmlu_val": "mmlu_val",  # MMLU's validation split, lm-eval's subject tasks (derived.py)
}
MACRO_METRICS = ("acc", "acc_norm")
BUILT_TASKS: dict[tuple, dict[str, Any]] = {}  # see built_tasks
MAX_BUILT_TASKS = 4


def draw_examples(task_dict: dict[str, Any], limit: int, seed: int) -> dict[str, list[int]]:
    """Sorted indices of `limit` documents (all when fewer) of every leaf task (each MMLU
    subject), drawn without replacement by a generator seeded with `seed` and the task's name:
    a task's draw does not depend on which other tasks run beside it. Sorted because lm-eval
    maps its n-th selected document back to `samples[n]`."""
    draw = {}
    for name, task in task_dict["tasks"].items():
        total = len(task.eval_docs)
        salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        rng = np.random.default_rng([seed, salt])
        picked = rng.choice(total, size=min(limit, total), replace=False)
        draw[name] = sorted(int(i) for i in picked)
    return draw


def check_drawn(results: dict[str, Any], draw: dict[str, list[int]] | None) -> None:
    """The logged examples are exactly the drawn ones (a wrong pairing is worse than a crash)."""
    for name, logged in (results.get("samples") or {}).items() if draw else ():
        got = sorted({int(sample["doc_id"]) for sample in logged})
        if got != draw[name]:
            raise RuntimeError(
                f"{name}: lm-eval evaluated documents {got[:5]}... where the draw is "
                f"{draw[name][:5]}...; nothing is recorded"
            )


@functools.cache
def task_manager() -> Any:
    """lm-eval's task index, with our derived tasks (`derived.py`: `mmlu_val`); building it
    scans ~15k YAMLs (~10 s), so once per process."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    add_derived_tasks(manager)
    return manager


@functools.cache
def known_tasks() -> frozenset[str]:
    return frozenset(task_manager().all_tasks)


def resolve_task(name: str) -> str:
    """lm-eval name for one of our names or an lm-eval task/group/tag; ValueError if unknown."""
    lm_name = TASK_ALIASES.get(name, name)
    if lm_name in known_tasks():
        return lm_name
    hint = did_you_mean(name, [*TASK_ALIASES, *task_manager().all_tasks], n=3)
    raise ValueError(f"unknown eval task {name!r} (an lm-eval task, group or tag{hint})")


def resolve_tasks(tasks: list[str]) -> dict[str, str]:
    """lm-eval name -> our name, for every requested task; one ValueError for all unknowns."""
    names, errors = {}, []
    for name in tasks:
        try:
            names[resolve_task(name)] = name
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError("; ".join(errors))
    return names


def resolve_fewshot(num_fewshot: dict[str, int], lm_tasks: list[str]) -> dict[str, int]:
    """Shots per requested lm-eval task. Keys must be task names; those not requested are
    ignored (so a profile's `{mmlu: 5}` survives a `tasks=[piqa]` override)."""
    shots = {}
    for name, count in num_fewshot.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"num_fewshot[{name!r}]={count!r}: must be an int >= 0")
        lm_name = resolve_task(name)
        if lm_name in lm_tasks:
            shots[lm_name] = count
    return shots


def built_tasks(
    lm_tasks: list[str], shots: dict[str, int], seed: int, data_root: str | None
) -> dict[str, Any]:
    """`load_tasks`, once per process for each task list, shots and data root, documents
    memoized. Building reads and maps every document, which a curve or sweep would repeat per
    point; lm-eval rebuilds the requests on each `evaluate`, and the few-shot samplers are
    reseeded here, so a reused task prompts exactly as a fresh one."""
    key = (tuple(lm_tasks), tuple(sorted(shots.items())), str(data_root))
    if key not in BUILT_TASKS:
        if len(BUILT_TASKS) >= MAX_BUILT_TASKS:
            BUILT_TASKS.pop(next(iter(BUILT_TASKS)))  # oldest first
        BUILT_TASKS[key] = load_tasks(lm_tasks, shots, seed)
        for task in task_objects(BUILT_TASKS[key]):
            memoize_docs(task)
    task_dict = BUILT_TASKS[key]
    for task in task_objects(task_dict):
        task.set_fewshot_seed(seed=seed)
    return task_dict


def task_objects(task_dict: dict[Any, Any]) -> Iterator[Any]:
    """Every task in lm-eval's nested {task or group: task, group or {…}} dict."""
    from lm_eval.api.task import Task

    for value in task_dict.values():
        if isinstance(value, dict):
            yield from task_objects(value)
        elif isinstance(value, Task):
            yield value


def load_tasks(lm_tasks: list[str], shots: dict[str, int], seed: int) -> dict[str, Any]:
    """Build the tasks (this reads the data) with per-task few-shot counts, as lm-eval's
    `TaskManager.load` result; duplicate subtasks across requests are an lm-eval error."""
    tm = task_manager()
    top = []
    for name in lm_tasks:
        part = tm.load([name])
        for task in part["tasks"].values():
            set_fewshot(task, shots.get(name), seed)
        # A group comes back with its subtasks; a tag expands to plain tasks.
        top += [part["groups"][name]] if name in part["groups"] else list(part["tasks"].values())
    return tm.load(top)


def set_fewshot(task: Any, shots: int | None, seed: int) -> None:
    """The rule of lm-eval's `simple_evaluate`: a YAML that pins 0 shots wins; unset means 0."""
    default = task.get_config("num_fewshot")
    if shots is not None and default == 0 and shots != 0:
        log.warning("%s pins num_fewshot=0 in its YAML; ignoring %d", task.task_name, shots)
    elif shots is not None:
        task.set_config(key="num_fewshot", value=shots)
    elif default is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)


def seed_everything(seed: int) -> None:
    """What `simple_evaluate` seeds; loglikelihood tasks are deterministic, sampling is not."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def empty_fewshot_error(shots: dict[str, int], data_root: str | None) -> ValueError:
    """lm-eval's sampler asserts on an empty pool; say which tasks asked for shots and why."""
    asked = {name: n for name, n in shots.items() if n > 0}
    return ValueError(
        f"few-shot examples requested ({asked}) but a task's few-shot split is empty: the "
        f"mirror at {data_root} has no train split for it; use 0 shots for that task"
    )


def flatten_results(results: dict[str, Any], names: dict[str, str]) -> dict[str, float]:
    """`{"<task>/<metric>": value}` for each requested task (under our name) and each leaf
    subtask, plus `<group>/<metric>_macro` for groups. lm-eval's intermediate groups (the four
    MMLU categories) are left out; so is any metric reported as "N/A"."""
    leaves = set(results.get("configs", {}))
    flat: dict[str, float] = {}
    for task, metrics in results["results"].items():
        if task in names or task in leaves:
            flat.update(task_metrics(names.get(task, task), metrics))
    subtasks = results.get("group_subtasks", {})
    for lm_name, ours in names.items():
        members = leaf_tasks(lm_name, subtasks)
        if members != [lm_name]:
            flat.update(macro_average(ours, members, results["results"]))
    return flat


def task_metrics(task: str, metrics: dict[str, Any]) -> dict[str, float]:
    """lm-eval keys are "<metric>,<filter>"; filter "none" is dropped from our key."""
    out = {}
    for key, value in metrics.items():
        metric, sep, filt = key.partition(",")
        if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "sample_len", "N/A" stderr, ...
        if math.isfinite(value):
            out[f"{task}/{metric if filt == 'none' else key}"] = float(value)
    return out


def leaf_tasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in leaf_tasks(child, group_subtasks)]


def macro_average(group: str, members: list[str], results: dict[str, Any]) -> dict[str, float]:
    """Unweighted mean over the group's leaf tasks, for metrics every leaf reports."""
    out = {}
    for metric in MACRO_METRICS:
        values = [results.get(m, {}).get(f"{metric},none") for m in members]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            out[f"{group}/{metric}_macro"] = float(np.mean(values))
    return out


def log_summary(
    flat: dict[str, float], names: dict[str, str], results: dict[str, Any], seconds: float
) -> None:
    """One line per requested task: its main metrics, examples scored and shots."""
    n_samples = results.get("n-samples", {})
    n_shot = results.get("n-shot", {})
    subtasks = results.get("group_subtasks", {})
    for lm_name, ours in names.items():
        members = leaf_tasks(lm_name, subtasks)
        n = sum(n_samples.get(m, {}).get("effective", 0) for m in members)
        shots = sorted({n_shot.get(m) for m in members if m in n_shot})
        scores = " ".join(
            f"{k.split('/', 1)[1]}={v:.4f}"
            for k, v in flat.items()
            if k.startswith(f"{ours}/") and "stderr" not in k
        )
        log.info("eval %s: %s (n=%d, shots=%s)", ours, scores, n, shots)
    log.info("eval of %s took %.1f s", ", ".join(names.values()), seconds)
