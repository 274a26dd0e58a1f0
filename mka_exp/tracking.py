"""Experiment tracking with wandb (offline by default: no account needed) or none.

Tracking is never allowed to lose a run: every wandb call is guarded, and a failure turns the
tracker off with one warning while the run goes on and its results still reach the disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


class NoTracker:
    """`logger=none`: tracks nothing."""

    def start(self, config: dict, name: str, output_dir: Path) -> None:
        pass

    def log_record(self, record: dict[str, Any], images: dict[str, Path]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NoTracker):
    """One wandb run per job: config, summary metrics, a one-row results table, figures."""

    def __init__(
        self,
        project: str = "mka-exp",
        mode: str = "offline",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r} is not allowed; choose one of {WANDB_MODES}")
        self.settings = {"project": project, "mode": mode, "entity": entity, "group": group}
        self.tags = list(tags or [])
        self.run = None

    def guarded(self, what: str, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any wandb failure: keep the run, drop the tracking
            log.warning("wandb %s failed (%s); continuing without wandb", what, err)
            self.run = None
            return None

    def start(self, config: dict, name: str, output_dir: Path) -> None:
        import wandb

        self.run = self.guarded(
            "init",
            wandb.init,
            config=config,
            name=name,
            dir=str(output_dir),
            tags=self.tags,
            reinit="finish_previous",
            **self.settings,
        )

    def log_record(self, record: dict[str, Any], images: dict[str, Path]) -> None:
        if self.run is None:
            return
        self.guarded("log", self._log, record, images)

    def _log(self, record: dict[str, Any], images: dict[str, Path]) -> None:
        import wandb

        from mka_exp.results import flatten_record

        row = flatten_record(record)
        self.run.summary.update(row)
        self.run.log({"results": wandb.Table(columns=list(row), data=[list(row.values())])})
        for key, path in images.items():
            self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.guarded("finish", self.run.finish)
        self.run = None
