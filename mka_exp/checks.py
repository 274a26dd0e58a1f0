"""The primitives of the checks that need no model, run before anything expensive.

A bad value found after compression costs the compression (97 s of MKA on SmolLM2): every check
that can be made from the settings alone runs before the model loads, and each failure is ONE
line naming the key, the bad value and what is allowed. `gather` runs a set of checks and reports every
failure at once (`ConfigError`, one line each), so a user fixes them in one go.

The functions take plain values (`preflight.check_config` reads them out of the config):

    check_positive("calib.max_length", 0)  # ValueError: calib.max_length=0: allowed ...
    gather(lambda: check_seed("seed", -1), lambda: check_positive("calib.max_length", 0))

Each stage's own checks live with the stage they guard: the evaluation backend's in
`evaluation/checks.py` (run by its constructor), calibration's in `calibration.py`, the model's in
`models/settings.py` and `models/declared.py`, the methods' in `methods/base.py` (run by their
constructors), the paths' in `results/files.py`, the logger's in `tracking.py`; the top-level
`seed` is checked here. Floor 0: imports nothing of mka_exp.
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


def check_seed(key: str, seed: Any, null: str | None = None) -> None:
    """A seed: an integer >= 0; given `null` (what null means for this key), null as well."""
    if seed is None and null is not None:
        return
    if not is_int(seed) or seed < 0:
        allowed = (f"null ({null}) or " if null is not None else "") + "an integer >= 0"
        raise ValueError(f"{key}={seed!r}: allowed: {allowed}")


# --- method, curve --------------------------------------------------------------------------
