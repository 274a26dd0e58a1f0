"""Checks of a run's settings that need no model, run before anything expensive.

A bad value found after compression costs the compression (97 s of MKA on SmolLM2): every check
that can be made from the settings alone runs here first, and each failure is ONE line naming
the key, the bad value and what is allowed. `gather` runs a set of checks and reports every
failure at once (`ConfigError`, one line each), so a user fixes them in one go.

The functions take plain values (`pipeline.check_config` reads them out of the config):

    check_limit(-1)                  # ValueError: eval.limit=-1: use an int > 0 ...
    gather(lambda: check_batch_size(0), lambda: check_positive("calib.max_length", 0))

Reading the benchmark files is the one costly check (`check_eval_data`): it builds the lm-eval
tasks, which read every file they use; the built tasks are kept for the evaluation
(`evaluation.built_tasks`), so nothing is read twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mka_exp.data import MMLU_SUBJECTS, check_data_root, mirror_dir, read_jsonl

LOCAL_TEXT = (".jsonl", ".json", ".txt")  # calib.path suffixes read as local files
MMLU_SPLITS = ("dev", "validation", "test")
MISSING_HINTS = {
    "calib.path": "a hub dataset id (calib.path=wikitext calib.name=wikitext-2-raw-v1) "
    "or a local .jsonl/.txt file",
}


class ConfigError(ValueError):
    """Every problem found, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def gather(*checks: Callable[[], Any]) -> None:
    """Run every check; raise one `ConfigError` listing all that failed."""
    from hydra.errors import InstantiationException

    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as err:
            problems += err.problems
        except InstantiationException as err:  # a constructor's own check, through Hydra
            problems.append(str(err.__cause__ or err))
        except (ValueError, OSError) as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # a shared setting's problem once


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(key: str, value: Any) -> None:
    """An integer >= 1 (lengths, sizes, counts)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{key}={value!r}: allowed an integer >= 1")


def check_missing(keys: Iterable[str]) -> None:
    """Mandatory settings (`???` in the yaml) that were not given."""
    problems = [
        f"{key} is not set (???); allowed: {MISSING_HINTS.get(key, 'any value')}, "
        f"given on the command line as {key}=..."
        for key in sorted(keys)
    ]
    if problems:
        raise ConfigError(problems)


def check_seed(seed: Any) -> None:
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r}: allowed an integer >= 0")


# --- eval -----------------------------------------------------------------------------------


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


# --- logger ---------------------------------------------------------------------------------


def check_logger_mode(mode: str | None, allowed: tuple[str, ...]) -> None:
    if mode is not None and mode not in allowed:
        raise ValueError(f"logger.mode={mode!r}: allowed {', '.join(allowed)}")


# --- method, curve --------------------------------------------------------------------------


def check_amount(ratio: Any, num_layers: Any) -> None:
    """The type of `method.ratio` / `method.num_layers` (the method checks the range)."""
    if ratio is not None and not is_number(ratio):
        raise ValueError(f"method.ratio={ratio!r} is not a number; allowed a float in (0, 1)")
    if num_layers is not None and not is_int(num_layers):
        raise ValueError(f"method.num_layers={num_layers!r}: allowed an integer >= 1")


def check_curve(curve: Any, has_ratio: bool) -> None:
    """null (one run) or a non-empty list of numbers; the method must take a ratio."""
    if curve is None:
        return
    example = "e.g. curve=[0.125,0.25,0.375], or null for a single run"
    if not isinstance(curve, list) or not curve:
        raise ValueError(
            f"curve={curve!r}: allowed a non-empty list of method.ratio values, {example}"
        )
    bad = [r for r in curve if not is_number(r)]
    if bad:
        raise ValueError(f"curve={curve!r}: {bad[0]!r} is not a number; {example}")
    if not has_ratio:
        raise ValueError(f"curve={curve!r}: this method has no method.ratio to walk")


def check_layer_bounds(method: Any, amounts: list[tuple], model: dict[str, Any]) -> None:
    """A layer method's amounts (ratio, num_layers) per point, and LaCo's `m`, against the
    model's layer count read from its config or GGUF header, before the weights load."""
    from mka_exp.methods.base import LayerMethod, layers_to_remove
    from mka_exp.models.declared import model_layers

    if not isinstance(method, LayerMethod):
        return
    total = model_layers(model)
    if total is None:
        return
    for ratio, count in amounts:
        layers_to_remove(total, ratio, count)
    if hasattr(method, "check_m"):  # LaCo: m layers merged into one per step
        method.check_m(total)


# --- calibration ----------------------------------------------------------------------------


def check_calibration(builder: str, settings: dict[str, Any]) -> None:
    """The settings of calibration builder `builder` (a `mka_exp.calibration` function name),
    with that function's defaults for keys not given; other builders check themselves."""
    import inspect

    from mka_exp import calibration

    check = CALIBRATION_CHECKS.get(builder)
    if check is None:
        return
    defaults = inspect.signature(getattr(calibration, builder)).parameters
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
