"""Job states from `squeue` when a Slurm cluster keeps no accounting (`sacct` unavailable).

submitit learns a job's state only from `sacct`. On a cluster without slurmdbd (small labs,
`tests/slurm/start_cluster.sh`) every poll fails with "Slurm accounting storage is disabled";
submitit then logs a warning per poll and, worse, never learns that a job was cancelled or
killed: the sweep waits forever for a result file that will not come.

This shim (a Hydra callback, `conf/hydra/callbacks/squeue_fallback.yaml`, which
`hydra/launcher=slurm` loads) swaps submitit's Slurm watcher for one that still asks `sacct`
first and, when it fails, reads the same fields from `squeue -t all` (which keeps ended jobs
for the cluster's MinJobAge). A job that is in neither has left the queue: it counts as ended,
so submitit reports it ("has not produced any output") instead of waiting. One log line says
which source is used. Import cost: submitit only, no torch.

    hydra:
      callbacks:
        squeue_fallback:
          _target_: mka_exp.sweep.squeue_fallback.SqueueFallback
"""

from __future__ import annotations

import logging
import subprocess
import time
from typing import Any

from hydra.experimental.callback import Callback
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

FIELDS = "JobID|State|NodeList"
SQUEUE_FORMAT = "%i|%T|%N"  # the same three fields, in sacct's --parsable2 layout
GONE = "GONE"  # in neither sacct nor squeue: ended; not one of submitit's "incomplete" states


class SqueueFallbackWatcher(SlurmInfoWatcher):
    """`SlurmInfoWatcher` that reads `squeue` whenever `sacct` fails."""

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self.sacct_disabled = False  # this cluster keeps no accounting: stop asking sacct
        self.noted = False

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        info = None if self.sacct_disabled else self.run(command)
        if info is None:
            info = self.squeue_info()
        self._info_dict.update(info)
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def run(self, command: list[str]) -> dict[str, Any] | None:
        """sacct's answer, or None (once noted in the log) when sacct cannot answer."""
        try:
            out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", "") or str(err)
            self.sacct_disabled = "accounting storage is disabled" in stderr
            if not self.noted:
                log.info("sacct unavailable (%s); job states come from squeue", stderr.strip())
                self.noted = True
            return None
        return self.read_info(out.stdout)

    def squeue_info(self) -> dict[str, Any]:
        waiting = self._registered - self._finished
        try:
            out = subprocess.run(
                ["squeue", "-h", "-t", "all", "-o", SQUEUE_FORMAT],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("squeue failed too (%s); job states unknown this poll", err)
            return {}
        info = self.read_info(f"{FIELDS}\n{out}")
        listed = {line.split("_")[0].split("|")[0] for line in out.splitlines()}
        for job_id in waiting:
            if job_id not in info and job_id.split("_")[0] not in listed:
                info[job_id] = {"JobID": job_id, "State": GONE, "NodeList": ""}
        return info


class SqueueFallback(Callback):
    """Installs `SqueueFallbackWatcher` in the process that launches and polls the sweep."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        install()


def install() -> None:
    if not isinstance(SlurmJob.watcher, SqueueFallbackWatcher):
        SlurmJob.watcher = SqueueFallbackWatcher(delay_s=SlurmJob.watcher._delay_s)
