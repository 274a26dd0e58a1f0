"""What every lm-eval backend shares: its settings, their checks, and the run from an lm-eval LM
to our flat metrics and per-example rows. A backend (`hf.HFEvaluation`, the one in `vllm.py`)
adds its own settings and says how the in-memory model becomes an lm-eval LM (`lm`).

Why a base class: the tasks, the example draw, the shots, the data root and the results are the
same whichever engine scores the requests; only the engine differs. So a new backend is its
module (a subclass with `lm`) and its yaml (`_target_` naming the subclass), nothing else.

Settings are checked in the constructor (Hydra builds it before the model loads), all problems
in one `ConfigError`, one line each; the benchmark files are read by `check_data`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd

from mka_exp.checks import gather
from mka_exp.data import check_data_root, offline_datasets
from mka_exp.evaluation import checks, harness
from mka_exp.evaluation.rows import from_lm_eval
from mka_exp.shims.lm_eval import quiet_lm_eval

log = logging.getLogger(__name__)

# settings that choose which requests are asked, not how one is answered
ASKED = ("tasks", "limit", "sample_seed", "num_fewshot", "data_root", "seed", "answer_cache")


def plain(value: Any) -> Any:
    """Hydra hands lists and mappings over as ListConfig / DictConfig: plain Python for the checks
    and for lm-eval."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@dataclass(kw_only=True)
class LMEvalBackend:
    """lm-eval `tasks` on the model as it is in memory.

    `limit`: int = examples per task (per subtask of a group), float in (0, 1] = fraction,
    None = all. `sample_seed`: None = the first `limit` examples of each task; an int = a seeded
    draw of `limit` of them per task (`harness.draw_examples`), the same for the same seed.
    `num_fewshot`: per-task shots; tasks not named use their lm-eval default (0 for ours).
    `data_root`: offline mirror to read instead of the hub. `seed`: lm-eval's seeds.
    `answer_cache`: a directory where each model's answers are kept as they come
    (`evaluation.answers`; None = off): a killed evaluation resumes there.
    """

    tasks: list[str] = field(default_factory=list)
    limit: int | float | None = None
    sample_seed: int | None = None
    batch_size: int | str = 8
    num_fewshot: dict[str, int] | None = None
    data_root: str | None = None
    seed: int = 1234
    answer_cache: str | None = None

    def __post_init__(self) -> None:
        self.tasks, self.num_fewshot = plain(self.tasks), plain(self.num_fewshot)
        gather(*self.setting_checks())

    def setting_checks(self) -> list[Callable[[], Any]]:
        """Each setting's check, needing no model; a backend adds its own."""
        return [
            lambda: checks.check_task_list(self.tasks),
            lambda: checks.check_limit(self.limit),
            lambda: checks.check_sample_seed(self.sample_seed, self.limit),
            lambda: checks.check_batch_size(self.batch_size),
            lambda: checks.check_fewshot(self.num_fewshot),
            lambda: checks.check_answer_cache(self.answer_cache),
        ]

    def check_data(self) -> None:
        """Task names (with close matches), few-shot names and every benchmark file the tasks
        read, before the model loads; the built tasks are kept for the evaluation."""
        check_data_root(self.data_root)
        checks.check_eval_data(self.tasks, self.num_fewshot, self.data_root, self.seed)

    def lm(self, model: Any, tokenizer: Any) -> contextlib.AbstractContextManager[Any]:
        """The lm-eval LM that scores `model`, for the time of one evaluation (a backend's part:
        a `contextlib.contextmanager` in its module)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how it scores a model")

    def evaluate(self, model: Any, tokenizer: Any) -> tuple[dict[str, float], pd.DataFrame]:
        """`{"<task>/<metric>": value}` and lm-eval's per-example outcomes as the rows of
        `evaluation.rows` (empty when there are no tasks)."""
        flat, results, names, task_dict = self.run(model, tokenizer, log_samples=True)
        subtasks = results.get("group_subtasks", {})
        owners = {leaf: ours for lm, ours in names.items()
                  for leaf in harness.leaf_tasks(lm, subtasks)}  # fmt: skip
        # each leaf's `doc_to_choice`: lm-eval's acc_norm divides by the lengths of its strings
        choices = {name: task.doc_to_choice for name, task in task_dict.get("tasks", {}).items()}
        return flat, from_lm_eval(results, owners, choices)

    def kept(self, lm: Any, model: Any, tokenizer: Any) -> contextlib.AbstractContextManager[Any]:
        """`lm` with its answers kept in `answer_cache` under this model's key, or `lm` itself."""
        if self.answer_cache is None:
            return contextlib.nullcontext(lm)
        from mka_exp.evaluation import answers

        start = time.perf_counter()
        key = answers.answer_key(model, tokenizer, self.scoring_settings())
        log.info("answer cache key %s in %.1f s", key, time.perf_counter() - start)
        return answers.cached(lm, str(self.answer_cache), key)

    def scoring_settings(self) -> dict[str, Any]:
        """The settings that shape an answer, as against which requests are asked (those are
        the requests themselves, lm-eval's key within the file)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ASKED}
        return {"backend": type(self).__qualname__, **settings}

    def scores(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """`evaluate`'s flat metrics alone (lm-eval logs no per-example records)."""
        return self.run(model, tokenizer)[0]

    def run(
        self, model: Any, tokenizer: Any, log_samples: bool = False
    ) -> tuple[dict[str, float], dict[str, Any], dict[str, str], dict[str, Any]]:
        """The flat metrics, lm-eval's raw results, the resolved task names (lm-eval's -> ours)
        and the built tasks (lm-eval's `TaskManager.load` dict)."""
        if not self.tasks:
            return {}, {}, {}, {}
        start = time.perf_counter()
        check_data_root(self.data_root)  # before the slow task index, so a bad root fails at once
        names = harness.resolve_tasks(self.tasks)
        results, task_dict = self.lm_eval_run(model, tokenizer, list(names), log_samples)
        flat = harness.flatten_results(results, names)
        harness.log_summary(flat, names, results, time.perf_counter() - start)
        return flat, results, names, task_dict

    def lm_eval_run(
        self, model: Any, tokenizer: Any, lm_tasks: list[str], log_samples: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """lm-eval's raw results for lm-eval task names (`results`, `group_subtasks`, ...) and
        the built tasks it evaluated."""
        from lm_eval import evaluator

        limit = checks.check_limit(self.limit)
        shots = harness.resolve_fewshot(self.num_fewshot or {}, lm_tasks)
        harness.seed_everything(self.seed)
        with quiet_lm_eval(), offline_datasets(self.data_root):
            task_dict = harness.built_tasks(lm_tasks, shots, self.seed, self.data_root)
            draw = None
            if self.sample_seed is not None:
                draw = harness.draw_examples(task_dict, limit, self.sample_seed)
            with self.lm(model, tokenizer) as engine, self.kept(engine, model, tokenizer) as lm:
                try:
                    results = evaluator.evaluate(lm, task_dict, limit=None if draw else limit,
                                                 samples=draw, log_samples=log_samples)  # fmt: skip
                except AssertionError as err:
                    if "no documents available for sampling" in str(err):
                        raise harness.empty_fewshot_error(shots, self.data_root) from err
                    raise
            harness.check_drawn(results, draw)
            return results, task_dict
