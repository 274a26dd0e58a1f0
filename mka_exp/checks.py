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

import os
from collections.abc import Callable, Iterable
from pathlib import Path
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


# --- logger, paths --------------------------------------------------------------------------


def check_writable_dir(key: str, path: str) -> None:
    """`path` is, or can be made, a directory this process writes into (nothing is created)."""
    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"{key}={str(path)!r}: {existing} is a file, not a directory; "
            "allowed: a directory you can write to"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={str(path)!r}: {existing} {not_writable(existing)}")


# What a records dir holds (results.py): each entry's kind and whether this user must be able to
# write the entry itself. The table and the records are replaced (written beside, then moved), so
# only their folder must be writable; the lock file is opened for writing by every writer.
RECORDS_LAYOUT = {
    "records": ("dir", True),
    "failures": ("dir", True),
    "claims": ("dir", True),
    "results.csv": ("file", False),
    "results.csv.lock": ("file", True),
}


def not_writable(path: Path) -> str:
    """Why `path` cannot be written, with its owner and mode (a shared root under umask 022)."""
    import pwd

    info = path.stat()
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = f"uid {info.st_uid}"
    return (
        f"is not writable for this user (owner {owner}, mode {info.st_mode & 0o7777:04o}); "
        "allowed: a path you can write to (on a shared root: chmod -R g+w by its owner, and umask "
        "002 for every user)"
    )


def check_records_dir(key: str, path: str) -> None:
    """The records dir and what it holds are what they should be (dir vs file) and writable."""
    check_writable_dir(key, path)
    root = Path(path).expanduser().absolute()
    for name, (kind, write) in RECORDS_LAYOUT.items():
        entry = root / name
        if not entry.exists() and not entry.is_symlink():
            continue
        if entry.is_dir() != (kind == "dir"):
            other = "directory" if entry.is_dir() else "file"
            raise ValueError(
                f"{key}={str(path)!r}: {entry} is a {other}, not a {kind}; "
                f"allowed: a records dir whose {name} is a {kind} (move the {other} away)"
            )
        mode = os.W_OK | (os.X_OK if kind == "dir" else 0)
        if write and not os.access(entry, mode):
            raise ValueError(f"{key}={str(path)!r}: {entry} {not_writable(entry)}")
    check_free_space(key, path)


MIN_FREE_BYTES = 10 * 2**20  # a point's record, per-example file, figures and temporaries


def check_free_space(key: str, path: str) -> None:
    """Room for a point's files: a run on a full disk would compute everything, then fail."""
    import shutil

    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise ValueError(
            f"{key}={str(path)!r}: only {free / 2**20:.2f} MB free on {existing}; allowed: a file "
            f"system with at least {MIN_FREE_BYTES // 2**20} MB free (free some space first)"
        )


# --- model ----------------------------------------------------------------------------------


def check_device(device: Any) -> None:
    """`auto`, `cpu`, or an accelerator this machine has (`cuda`, `cuda:<i>`, `mps`)."""
    import torch

    if device == "auto":
        return
    allowed = "auto, cpu" + (", cuda, cuda:<index>" if torch.cuda.is_available() else "")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"model.device={device!r} is not a device; allowed here: {allowed}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"model.device={device!r}: this machine has no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); allowed here: {allowed}"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"model.device={device!r}: only {torch.cuda.device_count()} CUDA device(s); "
            f"allowed: cuda:0 ... cuda:{torch.cuda.device_count() - 1}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"model.device={device!r}: MPS is not available; allowed here: {allowed}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"model.device={device!r}: allowed here: {allowed}")


def check_model_source(model: dict[str, Any]) -> None:
    """A pretrained model's source: one of path or wheel, and a local path is a model."""
    from mka_exp.models.loading import check_source

    if str(model.get("_target_")).endswith(".load_pretrained"):
        check_source(model.get("name_or_path"), model.get("gguf_file"), model.get("pip_package"))


def check_dtype(dtype: Any, allowed: Iterable[str]) -> None:
    choices = ("auto", *allowed)
    if dtype not in choices:
        raise ValueError(f"model.dtype={dtype!r}: allowed {', '.join(choices)}")


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


def model_layers(model: dict[str, Any]) -> int | None:
    """The layer count a model config will load, read without its weights (None: unknown)."""
    import inspect

    from mka_exp.models import loading as models

    target = str(model.get("_target_"))
    if target.endswith(".build_random_model"):
        default = inspect.signature(models.build_random_model).parameters["num_layers"].default
        return model.get("num_layers", default)
    if target.endswith(".load_pretrained"):
        names = inspect.signature(models.declared_layers).parameters
        return models.declared_layers(**{k: v for k, v in model.items() if k in names})
    return None


def check_layer_bounds(method: Any, amounts: list[tuple], model: dict[str, Any]) -> None:
    """A layer method's amounts (ratio, num_layers) per point, and LaCo's `m`, against the
    model's layer count read from its config or GGUF header, before the weights load."""
    from mka_exp.methods.base import LayerMethod, layers_to_remove

    if not isinstance(method, LayerMethod):
        return
    total = model_layers(model)
    if total is None:
        return
    for ratio, count in amounts:
        layers_to_remove(total, ratio, count)
    if hasattr(method, "check_m"):  # LaCo: m layers merged into one per step
        method.check_m(total)
