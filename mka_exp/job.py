"""The Hydra job this process runs: its overrides, whether it is one job of a multirun, the
`failed.json` a failed job leaves, a sweep stopped with its summary, and points deferred to a
sweep's end.

The pipeline reports through these, and the sweep callbacks (`mka_exp/sweep/callbacks.py`) read
what they leave; keeping them here lets both import them without the pipeline importing the
callbacks that run it. May import: `results`. Imported by the pipeline and `sweep/`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode

log = logging.getLogger(__name__)


FAILED = "failed.json"  # in a failed job's own directory


def error_line(err: BaseException) -> str:
    """`<Type>: <message>` of the error (of its cause when Hydra wrapped it)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def job_failed(output_dir: Path, line: str, err: BaseException, expected: bool) -> None:
    """Report a failed sweep job and leave `failed.json` in its directory; the sweep goes on.
    An unexpected error (a bug, not bad input) gets its traceback in the log too."""
    overrides = job_overrides()
    log.error("job failed: %s\n  overrides: %s", line, " ".join(overrides),
              exc_info=None if expected else err)  # fmt: skip
    write_failed(Path(output_dir), line, overrides)


def write_failed(output_dir: Path, line: str, overrides: list[str]) -> None:
    path = Path(output_dir) / FAILED
    tmp = path.with_name(f".{FAILED}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"error": line, "overrides": overrides}, indent=2))
        os.replace(tmp, path)
    except OSError as write_err:  # a full disk: the log line above is the record of it
        tmp.unlink(missing_ok=True)
        log.error("could not write %s (%s)", path, write_err.strerror)


def sweep_failures(sweep_dir: Path) -> list[dict[str, Any]]:
    """The failures left by the jobs of one sweep (a damaged file still counts as a failure)."""
    failures = []
    for path in sorted(Path(sweep_dir).rglob(FAILED)):
        try:
            failure = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            failure = {"error": f"unreadable {path} ({err})", "overrides": []}
        failures.append({**failure, "dir": str(path.parent)})
    return failures


def summary_lines(sweep_dir: Path) -> list[str]:
    """One line per failed job of the sweep (its overrides and error), after a count."""
    failures = sweep_failures(sweep_dir)
    if not failures:
        return []
    jobs = sum(1 for _ in Path(sweep_dir).rglob(".hydra"))
    lines = [f"{len(failures)} of {jobs} sweep job(s) failed (sweep dir {sweep_dir}):"]
    for failure in failures:
        overrides = " ".join(failure.get("overrides") or [])
        lines.append(f"  {overrides or failure['dir']}: {failure['error']}")
    return lines


def stop_sweep(reason: str) -> None:
    """Stop a sweep at this job (every later one would fail the same way): the summary of the
    failed jobs so far, and exit status 1."""
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    lines = summary_lines(sweep_dir) or [f"sweep dir {sweep_dir}:"]
    lines.insert(0, f"sweep stopped at job {HydraConfig.get().job.num}: {reason}; later jobs "
                    "were not started")  # fmt: skip
    lines.append("Rerun the same command to go on; finished points are skipped.")
    quiet_log_file_errors()
    log.error("\n".join(lines))
    raise SystemExit(1)


def quiet_log_file_errors() -> None:
    """The process is about to stop, maybe on a full disk: the console gets the message even
    when the job's log file (on that disk) cannot be written, without logging's own traceback."""
    logging.raiseExceptions = False


DEFERRED = "deferred.json"  # in the directory of a job whose points other runs were computing


FINISHING: list[bool] = []  # non-empty while the deferred jobs run at the sweep's end


def defers() -> bool:
    """A job whose points other runs are computing is deferred to the sweep's end when the jobs
    run in this process (the basic launcher), so the sweep's other points go first; a submitit
    job (its own process, maybe its own node) waits in place."""
    if not in_multirun() or FINISHING:
        return False
    return "BasicLauncher" in str(HydraConfig.get().launcher.get("_target_", ""))


def defer(output_dir: Path, config: dict[str, Any], labels: list[str]) -> None:
    """Leave the job's resolved config for `finish_deferred`."""
    log.info("point(s) %s: being computed by other runs; this job is deferred to the end of "
             "the sweep", ", ".join(labels))  # fmt: skip
    path = Path(output_dir) / DEFERRED
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "overrides": job_overrides()}, default=str))
