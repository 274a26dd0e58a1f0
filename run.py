"""mka-exp entry point: `python run.py [group=option ...] [key=value ...]` (add -m to sweep)."""

import sys
from pathlib import Path

import hydra

from mka_exp.canonical import check_override_keys
from mka_exp.choices import check_group_options


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def entry(cfg) -> None:
    from mka_exp.pipeline import main  # imported in the job, so a sweep launches without torch

    main(cfg)


if __name__ == "__main__":
    check_group_options(sys.argv[1:], Path(__file__).parent / "conf")  # Hydra would not suggest
    check_override_keys(sys.argv[1:], Path(__file__).parent / "conf")  # Hydra: 6 lines, no hint
    entry()
