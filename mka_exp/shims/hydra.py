"""Hydra workaround: a full disk met by Hydra's own writes of a sweep job.

Hydra writes each sweep job's `.hydra/*.yaml` before the job starts, where no check of ours runs;
a disk that filled up between two jobs ended the sweep in Hydra's traceback with no summary.
`on_full_disk_in_save_config(handler)` wraps that write so such an error calls `handler(path,
err)` instead (the sweep callbacks stop the sweep with its summary). Floor 1: imports Hydra,
nothing of mka_exp.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or this user's quota on it


def on_full_disk_in_save_config(handler: Callable[[Path, OSError], None]) -> None:
    """Route a full disk in Hydra's `_save_config` to `handler` (once; later calls keep it)."""
    from hydra.core import utils

    real = utils._save_config
    if getattr(real, "on_full_disk", False):
        return

    def save_config(cfg: Any, filename: str, output_dir: Any) -> None:
        try:
            real(cfg, filename, output_dir)
        except OSError as err:
            if err.errno not in FULL:
                raise
            handler(Path(output_dir) / filename, err)
            raise

    save_config.on_full_disk = True  # type: ignore[attr-defined]
    utils._save_config = save_config
