"""Sweeps that outlive a bad point, and run directories that never collide.

Hydra's launchers stop a sweep at the first job that raises (the basic launcher re-raises the
first failure once its batch is done, and `SystemExit` escapes it at once). So in a multirun
`pipeline.main` catches a job's error, logs its one line with the job's overrides, writes
`<job dir>/failed.json` (and the pipeline leaves `failures/<hash>.json` for the next resume) and
returns; the sweep goes on. `FailureSummary`, a Hydra callback (`hydra.callbacks` in
conf/config.yaml), reads the `failed.json` files of the sweep directory when the sweep ends,
logs which jobs failed and why, and exits with status 1. It reads files rather than job returns,
so it works the same with the basic launcher and the submitit (local, Slurm) launchers, whose
jobs run in other processes.

Sweeps that share an output root share work (`mka_exp/results/claims.py`): a job of the basic launcher
whose points other runs are computing is deferred (`deferred.json` in its directory) and run by
`FailureSummary` at the sweep's end, after the other jobs; it then waits for those points, or
computes them if their claims were abandoned.

Importing this module registers the `${unique:}` resolver used in `hydra.run.dir` and
`hydra.sweep.dir`: six random hex digits, drawn once per config (cached, and copied with the
config to submitit jobs), after the date and time, so runs started in the same second get
directories of their own. Hydra imports the module when it instantiates the callback, before
it resolves the run directory.

Example (conf/config.yaml)::

    hydra:
      callbacks:
        failures:
          _target_: mka_exp.sweep.callbacks.FailureSummary
      run:
        dir: ${paths.output_root}/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}-${unique:}
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

FAILED = "failed.json"  # in a failed job's own directory


def unique_suffix() -> str:
    return secrets.token_hex(3)


def stop_sweep_on_full_disk_in_hydra() -> None:
    """Shim: Hydra writes each sweep job's `.hydra/*.yaml` before the job starts, where no check
    of ours runs; a disk that filled up between two jobs ended the sweep in Hydra's traceback
    with no summary. Such a write now stops the sweep with its summary (`stop_sweep`)."""
    from hydra.core import utils

    real = utils._save_config
    if getattr(real, "stops_sweep", False):
        return

    def save_config(cfg: Any, filename: str, output_dir: Any) -> None:
        try:
            real(cfg, filename, output_dir)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT) or not in_multirun():
                raise
            from mka_exp.results.files import free_space

            path = Path(output_dir) / filename
            stop_sweep(f"the disk is full ({err.strerror} writing {path}, {free_space(path)})")

    save_config.stops_sweep = True  # type: ignore[attr-defined]
    utils._save_config = save_config


stop_sweep_on_full_disk_in_hydra()

if not OmegaConf.has_resolver("unique"):
    OmegaConf.register_new_resolver("unique", unique_suffix, use_cache=True)


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


class OutputRootCheck(Callback):
    """`paths.output_root` and the folder Hydra makes the run (or sweep) directory in, checked
    before Hydra creates it: that happens before the job starts, so the pipeline's checks come
    too late and a bad root (or a `runs/` folder of another user) ended in Hydra's traceback.
    One line, exit status 2, like the other checks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_root(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_root(config, "hydra.sweep.dir")


def check_output_root(config: DictConfig, run_dir_key: str) -> None:
    from mka_exp.results.files import check_writable_dir

    root = OmegaConf.select(config, "paths.output_root")
    run_dir = OmegaConf.select(config, run_dir_key)
    try:
        if root is not None:
            check_writable_dir("paths.output_root", str(root))
        if run_dir is not None:
            check_writable_dir(run_dir_key, str(run_dir))
    except ValueError as err:
        print(f"ERROR: ConfigError: {err}", file=sys.stderr)
        raise SystemExit(2) from None


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


def finish_deferred(sweep_dir: Path) -> None:
    """The deferred jobs, after the others: each waits for the points other runs are computing
    and computes those whose claim was abandoned; a failure leaves `failed.json` as any job's."""
    from mka_exp import pipeline

    FINISHING.append(True)
    try:
        for path in sorted(Path(sweep_dir).rglob(DEFERRED)):
            job = json.loads(path.read_text())
            log.info("deferred job %s: %s", path.parent.name, " ".join(job["overrides"]))
            try:
                pipeline.run(OmegaConf.create(job["config"]))
            except Exception as err:  # noqa: BLE001 (reported like any failed job)
                log.error("job failed: %s\n  overrides: %s", error_line(err),
                          " ".join(job["overrides"]))  # fmt: skip
                write_failed(path.parent, error_line(err), job["overrides"])
            path.unlink()
    finally:
        FINISHING.clear()


class FailureSummary(Callback):
    """At the end of a multirun: the deferred jobs (`finish_deferred`), then which jobs failed
    and why; exit status 1 if any did."""

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        """A disk that filled up during this job stops the sweep here: the next job would die
        in Hydra's own writes (its directory, its config), with a traceback and no summary."""
        from mka_exp.results.files import check_free_space

        records_dir = OmegaConf.select(config, "paths.records_dir")
        if not in_multirun() or records_dir is None:
            return
        try:
            check_free_space("paths.records_dir", str(records_dir))
        except ValueError as err:
            stop_sweep(f"the disk is full ({err})")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_deferred(Path(str(config.hydra.sweep.dir)))
        lines = summary_lines(Path(str(config.hydra.sweep.dir)))
        if not lines:
            return
        lines.append("Rerun the same command to retry them; finished points are skipped.")
        log.error("\n".join(lines))
        raise SystemExit(1)
