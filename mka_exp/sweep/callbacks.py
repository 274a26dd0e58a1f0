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

The `${unique:}` resolver of the run directories is `mka_exp/resolvers.py` (registered when
`mka_exp` is imported).

Example (conf/config.yaml)::

    hydra:
      callbacks:
        failures:
          _target_: mka_exp.sweep.callbacks.FailureSummary
      run:
        dir: ${paths.output_root}/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}-${unique:}
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mka_exp.job import (
    DEFERRED,
    FINISHING,
    error_line,
    in_multirun,
    stop_sweep,
    summary_lines,
    write_failed,
)
from mka_exp.shims.hydra import on_full_disk_in_save_config

log = logging.getLogger(__name__)


def stop_sweep_on_full_disk(path: Path, err: OSError) -> None:
    """Hydra's own write of a sweep job's config met a full disk: stop the sweep with its
    summary (`stop_sweep`), as a job of ours would (`shims/hydra.py`). Outside a multirun the
    error goes on as it was."""
    if in_multirun():
        from mka_exp.results.files import free_space

        stop_sweep(f"the disk is full ({err.strerror} writing {path}, {free_space(path)})")


on_full_disk_in_save_config(stop_sweep_on_full_disk)


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
