"""Checks of a run's settings that need no model, run before anything expensive.

A bad value found after compression costs the compression (97 s of MKA on SmolLM2): every check
that can be made from the settings alone runs here first, and each failure is ONE line naming
the key, the bad value and what is allowed. `gather` runs a set of checks and reports every
failure at once (`ConfigError`, one line each), so a user fixes them in one go.

The functions take plain values (`pipeline.check_config` reads them out of the config):

    check_positive("calib.max_length", 0)  # ValueError: calib.max_length=0: allowed ...
    gather(lambda: check_seed(-1), lambda: check_positive("calib.max_length", 0))

Evaluation's checks live with it (`mka_exp.evaluation.checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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
            cause = err.__cause__
            problems += cause.problems if isinstance(cause, ConfigError) else [str(cause or err)]
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
