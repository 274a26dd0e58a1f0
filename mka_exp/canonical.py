"""One experiment, one config hash: keys that nothing reads are refused, tasks named twice are
evaluated once.

A key no component reads (`+foo=bar`, `+method.ratoi=0.25`) changes nothing but the config hash,
so the same experiment would be recorded again under a new hash. The readable keys are derived,
never listed by hand: each group's `_target_` signature (a group without one: its reader in
`READERS`, else the keys of its yaml files), and the top-level keys of conf/config.yaml with the
groups of its defaults list. A new parameter of a component is thus a readable key at once.

`check_override_keys` runs on `run.py`'s command line before Hydra composes (Hydra refuses
`method.ratoi=0.25` itself, in six lines without a suggestion); `check_known_keys` on the composed
config (what `+key=value` added). Both give one line with the allowed keys and the closest one.
This module imports no data or model library: `run.py` imports it before every run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Keys Hydra's `instantiate` reads itself, beside the target's parameters.
HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}
# Who reads a group's node when it has no `_target_`: eval's default backend (recorded configs
# from before eval had a `_target_`); and the arguments the pipeline passes itself.
READERS = {"eval": "mka_exp.evaluation.hf.HFEvaluation"}
PASSED = {"calib": {"tokenizer"}}


def yaml_keys(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(path)) or {}
    return node if isinstance(node, dict) else {}


def top_level_keys(conf_dir: Path) -> set[str]:
    """The settings conf/config.yaml defines, the groups its defaults list selects, and every
    other group of the tree (selected with `+group=option`, e.g. `+compare=mka_vs_pruning`)."""
    config = yaml_keys(conf_dir / "config.yaml")
    groups = {d.name for d in conf_dir.iterdir() if d.is_dir() and any(d.glob("*.yaml"))}
    for entry in config.get("defaults", []):
        if isinstance(entry, dict):
            groups |= {k.split()[-1].split("@")[0] for k in entry}
    return set(config) - {"defaults"} | groups | {"hydra"}


def readable_keys(group: str, target: str | None, conf_dir: Path) -> set[str] | None:
    """The keys of a group's node that something reads: its target's (or reader's) parameters,
    else the keys of the group's yaml files; None when the target takes **kwargs (anything)."""
    import inspect

    from hydra._internal.utils import _locate

    reader = target or READERS.get(group)
    if reader is None:
        return set().union(*(yaml_keys(p) for p in sorted((conf_dir / group).glob("*.yaml"))))
    params = inspect.signature(_locate(reader)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return (set(params) - PASSED.get(group, set())) | HYDRA_KEYS


def unknown_key_line(key: str, value: Any, allowed: set[str], reader: str | None) -> str:
    """One line: the key, its value, who would read it, the allowed keys and the closest one."""
    from mka_exp.choices import did_you_mean

    shown = sorted(a for a in allowed if a not in HYDRA_KEYS)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    names = [prefix + a for a in shown]
    what = f"{reader} has no setting {key.rsplit('.', 1)[-1]!r}" if reader else "nothing reads it"
    return (
        f"{key}={value!r}: {what}, so it would change only the config hash; "
        f"allowed: {', '.join(names)}{did_you_mean(key, names)}"
    )


def check_known_keys(config: dict[str, Any], conf_dir: Path) -> None:
    """Every key of the resolved config is read by some component (`+foo=bar` is not). Needs
    the config tree beside the package (a checkout); without one nothing is checked."""
    if not (conf_dir / "config.yaml").is_file():
        return
    top = top_level_keys(conf_dir)
    problems = []
    for key, value in config.items():
        if key not in top:
            problems.append(unknown_key_line(key, value, top - {"hydra"}, None))
        elif isinstance(value, dict) and (conf_dir / key).is_dir():
            target = value.get("_target_")
            allowed = readable_keys(key, target, conf_dir)
            reader = str(target or READERS.get(key) or f"conf/{key}").rsplit(".", 1)[-1]
            for sub, setting in value.items():
                if allowed is not None and sub not in allowed:
                    problems.append(unknown_key_line(f"{key}.{sub}", setting, allowed, reader))
    if problems:
        from mka_exp.checks import ConfigError

        raise ConfigError(problems)


def unique_tasks(tasks: Any) -> tuple[Any, list[str]]:
    """`eval.tasks` without repeats (first occurrence kept), and the repeated names."""
    if not isinstance(tasks, list):
        return tasks, []
    kept = list(dict.fromkeys(tasks))
    repeated = sorted({t for t in tasks if tasks.count(t) > 1}, key=tasks.index)
    return kept, repeated


def check_override_keys(argv: list[str], conf_dir: Path) -> None:
    """`group.key=value` overrides (no `+`) naming a key the group's selected option does not
    have: Hydra refuses them while composing, before any check of ours, in six lines without a
    suggestion. One line and exit status 2 instead (`run.py` calls this first)."""

    for arg in argv:
        problem = unquoted_non_ascii(arg) or override_key_problem(arg, argv, conf_dir)
        if problem:
            print(f"ERROR: ConfigError: {problem}", file=sys.stderr)
            raise SystemExit(2)


def unquoted_non_ascii(arg: str) -> str | None:
    """Hydra's override lexer takes non-ASCII characters only inside quotes; unquoted, it fails
    with a `LexerNoViableAltException` that does not say so."""
    key, sep, value = arg.partition("=")
    if not sep or value.isascii() or value[:1] in "'\"" and value[-1:] == value[:1]:
        return None
    return (
        f"{key}={value}: Hydra reads non-ASCII characters only inside quotes; allowed: "
        f"{key}='{value}' (in a shell: \"{key}='{value}'\")"
    )


def selected_options(group: str, argv: list[str], conf_dir: Path) -> list[Path]:
    """The yaml files of `group` this command line can select (every option after an
    `experiment=`, which may choose another one)."""
    options = sorted((conf_dir / group).glob("*.yaml"))
    chosen = [a.partition("=")[2] for a in argv if a.lstrip("+").partition("=")[0] == group]
    if any(a.startswith("experiment=") for a in argv):
        return options
    if not chosen:
        defaults = yaml_keys(conf_dir / "config.yaml").get("defaults", [])
        chosen = [str(e[group]) for e in defaults if isinstance(e, dict) and group in e]
    names = {c.strip() for value in chosen for c in value.split(",")}
    return [p for p in options if p.stem in names] or options


def override_key_problem(arg: str, argv: list[str], conf_dir: Path) -> str | None:
    key, sep, value = arg.partition("=")
    if not sep or key[:1] in "+~-" or "." not in key or key.startswith("hydra"):
        return None
    group, sub = key.split(".")[:2]
    if not (conf_dir / group).is_dir():
        return None
    options = selected_options(group, argv, conf_dir)
    present = set().union(*(yaml_keys(p) for p in options))
    if not options or sub in present:
        return None
    targets = {yaml_keys(p).get("_target_") for p in options}
    readable = set().union(*(readable_keys(group, t, conf_dir) or set() for t in targets))
    if sub in readable:
        return f"{key}={value}: not set by {group}'s yaml; add it with +{key}={value}"
    reader = ", ".join(sorted(str(t or READERS.get(group) or group).rsplit(".", 1)[-1]
                              for t in targets))  # fmt: skip
    return unknown_key_line(f"{group}.{sub}", typed(value), present | readable, reader)


def typed(value: str) -> Any:
    """A command-line value as Hydra would type it (`0.25` a float), for the message."""
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value
