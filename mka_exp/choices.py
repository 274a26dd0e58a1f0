"""Close-match suggestions for unknown names: config group options, eval tasks, report options.

Hydra rejects an unknown group option (`method=shortgtp`) with a list of every option and no
suggestion, and it does so while composing, before any callback of ours runs. So `run.py` calls
`check_group_options` on its command line first: one line naming the key, the bad value, the
closest option and the allowed ones, exit status 2, like every other settings check.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from pathlib import Path


def did_you_mean(name: str, options: Iterable[str], n: int = 1) -> str:
    """'; did you mean a?' ('; did you mean a, b?' for n > 1), or '' when nothing is close:
    the tail of a message that lists the allowed names first."""
    close = difflib.get_close_matches(name, list(options), n=n)
    return f"; did you mean {', '.join(close)}?" if close else ""


def group_options(conf_dir: Path, group: str) -> list[str]:
    """The options of a config group: the yaml files of its folder (none if it is no group)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def unknown_group_option(arg: str, conf_dir: Path) -> str | None:
    """The problem with one `group=option[,option...]` override, or None (also for any other
    argument: keys, flags, Hydra's own groups, sweep functions such as `choice(...)`)."""
    key, sep, value = arg.partition("=")
    group = key.lstrip("+~")
    if not sep or group.startswith("hydra") or "." in group or "(" in value:
        return None
    options = group_options(conf_dir, group)
    if not options:
        return None
    for choice in (c.strip() for c in value.split(",")):
        if choice not in (*options, "null"):
            allowed = f"options: {', '.join(options)}{did_you_mean(choice, options)}"
            return f"{group}={value}: unknown {group} {choice!r} ({allowed})"
    return None


def check_group_options(argv: list[str], conf_dir: Path) -> None:
    """Exit 2 with one line at the first override naming an option its group does not have."""
    for arg in argv:
        problem = unknown_group_option(arg, conf_dir)
        if problem:
            print(f"ERROR: ConfigError: {problem}", file=sys.stderr)
            raise SystemExit(2)
