"""Experiment tracking with wandb (offline by default: no account needed) or none.

Tracking is never allowed to lose a run: every wandb call is guarded, and a failure turns the
tracker off with one warning while the run goes on and its results still reach the disk.

Tracking never makes a run wait on the network either. With `logger.mode=online` the server is
probed once per tracker (a TCP connect, `probe_timeout` seconds) before the first `wandb.init`;
an unreachable server turns the tracker offline for the rest of the process with one warning
(`wandb sync` uploads the offline runs later), and `wandb.init` gets a short `init_timeout` (a
server that accepts the connection but hangs falls back the same way). The pipeline keeps one
tracker per process (a curve's points and a basic-launcher sweep's jobs share it), so an
unreachable server costs one probe per process, not one 90-second wait per point.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


def wandb_base_url() -> str:
    """The server wandb would talk to: WANDB_BASE_URL, `wandb login --host`, else its default."""
    if os.environ.get("WANDB_BASE_URL"):  # read now: wandb's settings singleton keeps the first
        return os.environ["WANDB_BASE_URL"]
    try:
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.base_url)
    except Exception:  # an unreadable wandb settings file: the environment still counts
        return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def reachable(url: str, timeout: float) -> str | None:
    """None when a TCP connection to the URL's host and port opens within `timeout` seconds,
    else why not (one short line)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        return f"{parts.hostname}:{port}: {err.strerror or type(err).__name__}"
    return None


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
        init_timeout: float = 15.0,
        probe_timeout: float = 3.0,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r} is not allowed; choose one of {WANDB_MODES}")
        self.settings = {"project": project, "mode": mode, "entity": entity, "group": group}
        self.tags = list(tags or [])
        self.init_timeout, self.probe_timeout = init_timeout, probe_timeout
        self.run = None

    def guarded(self, what: str, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any wandb failure: keep the run, drop the tracking
            log.warning("wandb %s failed (%s); continuing without wandb", what, err)
            self.run = None
            return None

    def go_offline(self, why: str) -> None:
        """The rest of this process logs offline: one warning, no more waiting on the server."""
        self.settings["mode"] = "offline"
        log.warning("wandb server unreachable (%s); logging offline instead (upload later with "
                    "`wandb sync <run dir>/wandb/offline-run-*`)", why)  # fmt: skip

    def start(self, config: dict, name: str, output_dir: Path) -> None:
        import wandb

        self.run = None
        if self.settings["mode"] == "online":
            why = reachable(wandb_base_url(), self.probe_timeout)
            if why is not None:
                self.go_offline(why)
        kwargs = dict(config=config, name=name, dir=str(output_dir), tags=self.tags)
        kwargs.update(reinit="finish_previous", **self.settings)
        try:
            self.run = wandb.init(**kwargs, settings=wandb.Settings(init_timeout=self.init_timeout))
        except Exception as err:  # a server that answers the probe but not wandb.init
            if self.settings["mode"] != "online":
                log.warning("wandb init failed (%s); continuing without wandb", err)
                return
            self.go_offline(str(err).splitlines()[0])
            kwargs["mode"] = "offline"
            self.run = self.guarded("init", wandb.init, **kwargs)

    def log_record(self, record: dict[str, Any], images: dict[str, Path]) -> None:
        if self.run is None:
            return
        self.guarded("log", self._log, record, images)

    def _log(self, record: dict[str, Any], images: dict[str, Path]) -> None:
        import wandb

        from mka_exp.results.table import flatten_record

        row = flatten_record(record)
        self.run.summary.update(row)
        self.run.log({"results": wandb.Table(columns=list(row), data=[list(row.values())])})
        for key, path in images.items():
            self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.guarded("finish", self.run.finish)
        self.run = None


def check_logger_mode(mode: str | None, allowed: tuple[str, ...]) -> None:
    if mode is not None and mode not in allowed:
        raise ValueError(f"logger.mode={mode!r}: allowed {', '.join(allowed)}")
