"""Claims: sweeps that share an output root compute each point once.

A point being computed is claimed in the records dir: `claims/<config_hash>.json` holds the host,
pid and start time of the run computing it, and its mtime is the heartbeat (a daemon thread
touches every claim of the process each `HEARTBEAT_S`). Claims are taken under the table's lock
(`table.writing`), which also serialises the records, so two runs never both take one point.

A run skips a point another run has claimed and, once its own points are done, waits for the
claimed ones (their records appear). A claim is taken over when its heartbeat stopped for
`STALE_S` (a killed job on any node; MKA_EXP_CLAIM_STALE_S sets it) or, on the same host, at once
when its process is gone. A run releases its claims when it ends, however it ends (SIGKILL
aside: then the heartbeat stops).

    with Claims(records_dir) as claims:
        state = claims.take(key)      # OURS, DONE, or the other run's claim (a dict)
        ...
        claims.release(key)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mka_exp.results.files import write_json_atomic
from mka_exp.results.records import record_path
from mka_exp.results.table import writing

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = float(os.environ.get("MKA_EXP_CLAIM_STALE_S", 60))
POLL_S = 2.0
OURS, DONE = "ours", "done"
HOST = socket.gethostname()


def claim_path(records_dir: Path, key: str) -> Path:
    return Path(records_dir) / "claims" / f"{key}.json"


def holder(claim: dict[str, Any] | None) -> str:
    if not claim:
        return "an unreadable claim"
    return f"{claim.get('host')}:{claim.get('pid')}"


def read_claim(path: Path) -> dict[str, Any] | None:
    try:
        claim = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return claim if isinstance(claim, dict) else None


def pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # another user's process, or a pid we cannot judge: assume alive
    return True


def stale(path: Path, claim: dict[str, Any] | None) -> str | None:
    """Why the claim no longer holds (None: it does)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "released"
    if claim is None:
        return "unreadable" if age > HEARTBEAT_S else None  # a claim being written: wait
    if claim.get("host") == HOST and not pid_alive(claim.get("pid")):
        return f"its process {claim.get('pid')} on this host is gone"
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s"
    return None


class Claims:
    """The claims this process holds in one records dir, kept fresh by a heartbeat thread."""

    def __init__(self, records_dir: Path) -> None:
        self.records_dir = Path(records_dir)
        self.held: set[str] = set()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for key in list(self.held):
            self.release(key)

    def mine(self) -> dict[str, Any]:
        return {"host": HOST, "pid": os.getpid(), "started": time.time()}

    def take(self, key: str) -> str | dict[str, Any]:
        """Claim the point: OURS, DONE (its record exists), or the live claim of another run."""
        path = claim_path(self.records_dir, key)
        with writing(self.records_dir):
            if record_path(self.records_dir, key).exists():
                return DONE
            if key in self.held:
                return OURS
            if path.exists():
                claim = read_claim(path)
                reason = stale(path, claim)
                if reason is None:
                    return claim or {}
                log.warning("point %s: the claim of %s is stale (%s); this run takes it over",
                            key, holder(claim), reason)  # fmt: skip
            write_json_atomic(path, self.mine())
            self.held.add(key)
        self.beat()
        return OURS

    def release(self, key: str) -> None:
        if key in self.held:
            self.held.discard(key)
            claim_path(self.records_dir, key).unlink(missing_ok=True)

    def beat(self) -> None:
        """Start the heartbeat thread (once)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self.heartbeat, name="claims", daemon=True)
            self.thread.start()

    def heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            for key in list(self.held):
                with contextlib.suppress(OSError):  # released meanwhile, or a passing NFS error
                    os.utime(claim_path(self.records_dir, key))

    def busy(self, keys: Iterable[str]) -> list[str]:
        """The keys that another run holds a live claim on (nothing is claimed)."""
        out = []
        for key in keys:
            path = claim_path(self.records_dir, key)
            if key not in self.held and path.exists() and stale(path, read_claim(path)) is None:
                out.append(key)
        return out

    def wait_for(self, keys: list[str], labels: dict[str, str]) -> list[str]:
        """Wait until each point is recorded or its claim is abandoned (stale, or released with
        no record: the other run failed); returns the abandoned ones, for this run to compute."""
        pending, abandoned = list(keys), []
        if pending:
            holders = {holder(read_claim(claim_path(self.records_dir, k))) for k in pending}
            log.info("waiting for %d point(s) that other runs (%s) are computing: %s",
                     len(pending), ", ".join(sorted(holders)),
                     ", ".join(labels[k] for k in pending))  # fmt: skip
        while pending:
            for key in list(pending):
                path = claim_path(self.records_dir, key)
                if record_path(self.records_dir, key).exists():
                    pending.remove(key)
                elif stale(path, read_claim(path)) is not None:
                    pending.remove(key)
                    abandoned.append(key)
            if pending:
                time.sleep(POLL_S)
        return abandoned
