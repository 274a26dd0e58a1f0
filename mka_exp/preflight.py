"""Before anything loads: settle the amount, canonicalise the config, and run every check that
needs no model, reporting all problems at once (`checks.gather`: one line per bad setting).

The checks themselves live with the stage they guard (evaluation's in its backend's
constructor, calibration's in `calibration.py`, the model's in `models/settings.py` and
`models/declared.py`, the methods' in `methods/base.py`, the paths' in `results/files.py`); this
module only reads them out of the config, which is why it sits beside `pipeline.py`, the other
reader of the config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mka_exp import checks, job
from mka_exp.results import files

log = logging.getLogger("mka_exp.pipeline")  # its warnings read as the run's, as before
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def check_curve(curve: Any, has_ratio: bool) -> None:
    """null (one run) or a non-empty list of numbers; the method must take a ratio."""
    if curve is None:
        return
    example = "e.g. curve=[0.125,0.25,0.375], or null for a single run"
    if not isinstance(curve, list) or not curve:
        raise ValueError(
            f"curve={curve!r}: allowed a non-empty list of method.ratio values, {example}"
        )
    bad = [r for r in curve if not checks.is_number(r)]
    if bad:
        raise ValueError(f"curve={curve!r}: {bad[0]!r} is not a number; {example}")
    if not has_ratio:
        raise ValueError(f"curve={curve!r}: this method has no method.ratio to walk")


def settle_amount(cfg: DictConfig) -> None:
    """`method.num_layers=N` alone works: a layer count replaces the yaml's default ratio, which
    is cleared so the config (and its hash) holds only the amount used. Both on the command line,
    or a layer count with a curve of ratios, is refused: one of them would be ignored."""
    method = cfg.method
    if method.get("num_layers") is None or method.get("ratio") is None:
        return
    given = {o.lstrip("+~").split("=", 1)[0] for o in job.job_overrides()}
    if {"method.ratio", "method.num_layers"} <= given or cfg.get("curve"):
        what = f"curve={list(cfg.curve)}" if cfg.get("curve") else f"method.ratio={method.ratio}"
        raise ValueError(
            f"{what} and method.num_layers={method.num_layers} both set how many layers go; "
            "allowed: one of them"
        )
    method.ratio = None


def canonicalise(cfg: DictConfig) -> None:
    """One experiment, one config (and hash): a task named twice is evaluated once (warning)."""
    from mka_exp.canonical import unique_tasks

    tasks = OmegaConf.to_container(cfg.eval, resolve=True).get("tasks")
    kept, repeated = unique_tasks(tasks)
    if repeated:
        log.warning("eval.tasks=%s names %s more than once; evaluating each once: eval.tasks=%s",
                    tasks, ", ".join(repeated), kept)  # fmt: skip
        cfg.eval.tasks = kept


def check_config(cfg: DictConfig) -> None:
    """Every check that needs no model, before anything loads or is written: one line per bad
    setting, all at once (`checks.gather`). The benchmark files are read by the evaluation
    backend's `check_data` in `pipeline.compute_points`, still before the model loads."""
    from mka_exp import canonical
    from mka_exp.calibration import check_against_eval, check_calibration
    from mka_exp.data import check_data_root
    from mka_exp.models.settings import DTYPES, check_device, check_dtype, check_model_source
    from mka_exp.tracking import WANDB_MODES, check_logger_mode

    checks.check_missing(OmegaConf.missing_keys(cfg))
    c = OmegaConf.to_container(cfg, resolve=True)
    ev, model, method, calib = c["eval"], c["model"], c["method"], c["calib"]
    checks.gather(
        lambda: canonical.check_known_keys(c, CONF_DIR),
        lambda: checks.check_seed("seed", c.get("seed")),
        lambda: check_built(cfg.eval),
        lambda: check_logger_mode(c["logger"].get("mode"), WANDB_MODES),
        lambda: files.check_records_dir("paths.records_dir", c["paths"]["records_dir"]),
        lambda: files.check_writable_dir("paths.output_dir", c["paths"]["output_dir"]),
        lambda: check_cache_dir(method.get("cache")),
        lambda: check_data_root(c.get("data_root")),
        lambda: check_calibration(str(calib.get("_target_")).rsplit(".", 1)[-1], calib),
        lambda: check_model_source(model),
        lambda: check_against_eval(calib, ev),
        lambda: check_device(model.get("device", "auto")),
        lambda: check_dtype(model.get("dtype", "auto"), DTYPES),
        lambda: check_built(cfg.method),
        lambda: check_curve_methods(cfg, c.get("curve")),
        lambda: check_eval_none(group_choice("eval"), ev.get("tasks")),
    )


def group_choice(group: str) -> str | None:
    """The option Hydra composed for `group` (None outside a Hydra run, e.g. the compose API)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def check_eval_none(choice: str | None, tasks: Any) -> None:
    """`eval=none` means no evaluation; but keys set after the group (an experiment's `eval:`
    block) still land, so `experiment=X eval=none` would evaluate X's tasks."""
    if choice == "none" and tasks:
        raise ValueError(f"eval=none, but eval.tasks={list(tasks)!r} (set after the group, e.g. by "
                         "an experiment): pass eval.tasks=[] to skip evaluation, or choose an eval "
                         "option that evaluates")  # fmt: skip


def check_built(node: DictConfig) -> None:
    """A stage checks its own settings as Hydra builds it (the evaluation backend, the method:
    their constructors). A key it does not take (a TypeError) is left to
    `canonical.check_known_keys`, whose line names the closest key."""
    try:
        instantiate(node)
    except InstantiationException as err:
        if not isinstance(err.__cause__, TypeError):
            raise


def check_cache_dir(cache: Any) -> None:
    """The method's activation cache (a folder under the output root by default)."""
    if isinstance(cache, str):
        files.check_writable_dir("method.cache", cache)


def check_curve_methods(cfg: DictConfig, curve: Any) -> None:
    """`curve` is a non-empty list and the method accepts each of its ratios."""
    check_curve(curve, "ratio" in cfg.method)
    reset = {"num_layers": None} if "num_layers" in cfg.method else {}
    for ratio in curve or []:
        try:
            instantiate(cfg.method, ratio=ratio, **reset)
        except InstantiationException as err:
            raise ValueError(f"curve={curve}: {err.__cause__ or err}") from None


def check_layer_bounds(method, configs: list[DictConfig], model_cfg: DictConfig) -> None:
    """How many layers each point removes (and LaCo's `m`), against the layer count in the
    model's config or GGUF header: before the weights load."""
    from mka_exp.methods.base import check_layer_bounds as check

    amounts = [(c.method.get("ratio"), c.method.get("num_layers")) for c in configs]
    check(method, amounts, OmegaConf.to_container(model_cfg, resolve=True))
