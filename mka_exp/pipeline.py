"""The recipe: load → calibrate → compress → quantize → (save) → evaluate → record.

This is the only module that reads the Hydra config; every component it builds takes plain
arguments. `main(cfg)` is what `run.py` calls: it turns a user error into one clear line and a
non-zero exit; `run(cfg)` returns the run record (tests call it directly).

A run is a list of points: one for a plain run, several for `curve=[r1, r2, ...]`. A curve point's
config is exactly the single run's config at that ratio, so both share one config hash: a point
finished either way is never computed again (resume), and the records are interchangeable.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mka_exp import job, preflight
from mka_exp.contracts import EvaluationBackend, Quantizer
from mka_exp.layers import num_layers
from mka_exp.methods.base import layers_to_remove
from mka_exp.models.loading import check_finite
from mka_exp.quantizers import NoQuant
from mka_exp.quantizers.accounting import paper_compression_ratio, parameter_count, zero_fraction
from mka_exp.repair.none import NoRepair
from mka_exp.results import claims, files, records, table
from mka_exp.results.artifacts import print_summary, record_images, save_artifacts
from mka_exp.results.samples import write_samples
from mka_exp.resume import Point, claimed, mark_failed, progress, recorded_points
from mka_exp.runtime import Interrupted, Stopwatch, peak_memory, stop_on_signals

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotImplementedError, RuntimeError)


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry point behind `@hydra.main`: one line and exit code 2 on bad input. In a multirun a
    failed job is reported (its error line and overrides) and the sweep goes on; the sweep exits
    1 at its end with a summary (`mka_exp.sweep.callbacks.FailureSummary`). A full disk stops a curve (and
    a sweep, with its summary): exit 1. SIGTERM (Slurm's time limit, preemption, scancel) and
    SIGINT abandon the point being computed: one line, exit 128 + the signal (143, 130)."""
    with stop_on_signals():
        try:
            return run(cfg)
        except Interrupted as stop:
            log.error("%s", stop.line())
            raise SystemExit(128 + stop.signum) from None
        except Exception as err:
            return failed(cfg, err)


def failed(cfg: DictConfig, err: Exception) -> None:
    """Report a run's error: one line (a traceback too for a bug), or a sweep job's failure."""
    full = isinstance(err, files.DiskFull)
    expected = full or isinstance(err, (InstantiationException, *USER_ERRORS))
    if full:
        job.quiet_log_file_errors()
    line = job.error_line(err)
    if job.in_multirun():
        job.job_failed(Path(cfg.paths.output_dir), line, err, expected)
        if full:  # every later job would fail the same way (or die in Hydra's own writes)
            job.stop_sweep(f"the disk is full ({line})")
        return None
    if not expected:
        raise err
    log.error("%s", line)
    raise SystemExit(1 if full else 2) from None


def method_name(cfg: DictConfig) -> str:
    """The method's module name, which is also its yaml's name (`methods/mka.py` ↔ `method=mka`)."""
    return cfg.method._target_.rsplit(".", 2)[-2]


def quantizer_name(cfg: DictConfig) -> str:
    """The quantizer's class name in lower case (`GPTQ` ↔ `quant=gptq`); `none` for no quantizer."""
    name = cfg.quant._target_.rsplit(".", 1)[-1].lower()
    return "none" if name == "noquant" else name


def run_name(cfg: DictConfig) -> str:
    amount = cfg.method.get("ratio") or cfg.method.get("num_layers")
    parts = [cfg.model.get("name") or "model", method_name(cfg), amount, quantizer_name(cfg)]
    return "-".join(str(p) for p in parts if p is not None)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One run; with `curve=[r1, r2, ...]` a whole compression curve (returns its last record)."""
    preflight.settle_amount(cfg)
    preflight.canonicalise(cfg)
    preflight.check_config(cfg)
    return run_points(cfg, curve_points(cfg))[-1]


def curve_points(cfg: DictConfig) -> list[DictConfig]:
    """The config of every point: a curve point is exactly the single run at that ratio."""
    if not cfg.get("curve"):
        return [cfg]
    points = []
    for ratio in sorted(set(cfg.curve)):
        point = cfg.copy()
        point.curve = None
        point.method.ratio = ratio
        if "num_layers" in point.method:
            point.method.num_layers = None
        points.append(point)
    return points


@dataclass
class Session:
    """What every point of a run shares: the loaded model, calibration set and built parts."""

    name: str
    model: Any
    tokenizer: Any
    calib: Any
    layers_before: int
    params_before: int
    quantizer: Quantizer
    evaluation: EvaluationBackend


def plan_points(cfg: DictConfig, configs: list[DictConfig]) -> list[Point]:
    base = Path(cfg.paths.output_dir)
    points = []
    for point_cfg in configs:
        config = OmegaConf.to_container(point_cfg, resolve=True)
        out = base if len(configs) == 1 else base / f"ratio_{point_cfg.method.ratio}"
        points.append(Point(point_cfg, config, records.config_hash(config), out))
    return points


def run_points(cfg: DictConfig, configs: list[DictConfig]) -> list[dict[str, Any]]:
    """Load once, walk the points in order; points already recorded are not evaluated again."""
    records_dir = Path(cfg.paths.records_dir)
    points = plan_points(cfg, configs)
    try:
        return resume_points(cfg, configs, points, records_dir)
    except Interrupted as stop:  # not a failure of the point: nothing is marked
        stop.progress = progress(points, records_dir)
        raise


def resume_points(
    cfg: DictConfig, configs: list[DictConfig], points: list[Point], records_dir: Path
) -> list[dict[str, Any]]:
    """The records of the points, computing those not recorded yet (see `run_points`). A point
    another run has claimed is skipped and waited for at the end (`mka_exp/results/claims.py`), or at the
    sweep's end for a job of the basic launcher (None in its place); one whose claim is abandoned
    meanwhile is computed here after all (the model is loaded again)."""
    done = recorded_points(cfg.get("resume", True), points, records_dir)
    if all(done.values()):
        log.info("all %d point(s) already recorded in %s; skipping", len(points), records_dir)
        return [done[p.key] for p in points]
    share = cfg.get("resume", True)  # resume=false computes every point again: no claims
    with claims.Claims(records_dir) as held:
        todo = [p.key for p in points if not done[p.key]]
        if not share or len(held.busy(todo)) < len(todo):  # else nothing to load the model for
            compute_guarded(cfg, configs, points, done, held if share else None)
        waiting = [p for p in points if not done[p.key]]
        labels = {p.key: p.label for p in points}
        if (
            waiting and job.defers()
        ):  # the sweep's other jobs first (`sweep/callbacks.finish_deferred`)
            config = OmegaConf.to_container(cfg, resolve=True)
            job.defer(Path(cfg.paths.output_dir), config, [labels[p.key] for p in waiting])
            return [done[p.key] for p in points]
        held.wait_for([p.key for p in waiting], labels)
    for point in waiting:
        done[point.key] = records.load_record(records_dir, point.key)
    lost = [p for p in waiting if done[p.key] is None]  # claim abandoned, or the other run failed
    if lost:
        for point, record in zip(lost, resume_points(cfg, [p.cfg for p in lost], lost,
                                                     records_dir), strict=True):  # fmt: skip
            done[point.key] = record
    return [done[p.key] for p in points]


def compute_guarded(
    cfg: DictConfig, configs: list[DictConfig], points: list[Point], done: dict, held
) -> None:
    """`compute_points`; on an error each unfinished point of this run gets a failure marker."""
    records_dir = Path(cfg.paths.records_dir)
    finished: set[str] = set()
    try:
        compute_points(cfg, configs, points, done, finished, held)
    except Exception as err:  # each unfinished point is marked; the next resume retries it
        others = set(held.busy(p.key for p in points)) if held else set()
        unfinished = [p for p in points if not done[p.key] and p.key not in finished | others]
        mark_failed(records_dir, unfinished, job.error_line(err))
        if isinstance(err, files.DiskFull):
            raise files.DiskFull(err.errno, f"{err}; {progress(points, records_dir)}. Free "
                                   "space, then run the same command again (finished points "
                                   "are skipped)") from None  # fmt: skip
        raise


def compute_points(
    cfg: DictConfig,
    configs: list[DictConfig],
    points: list[Point],
    done: dict,
    finished: set,
    held: claims.Claims | None = None,
) -> None:
    """Load once and compute the points not in `done` that this run can claim (`held`; None:
    no claims), putting each record into `done` and its key into `finished`."""
    torch.manual_seed(cfg.seed)
    # The first point's method: for a one-point curve the top-level config still holds the
    # yaml's ratio, and a method built from it cut at that ratio under the point's label.
    method = instantiate(configs[0].method)  # bad values fail before the model loads
    repair = instantiate(cfg.repair) if "repair" in cfg else NoRepair()
    repair.check_method(method)
    quantizer, evaluation = instantiate(cfg.quant), instantiate(cfg.eval)
    evaluation.check_data()  # task names and benchmark files, before the model loads
    preflight.check_layer_bounds(method, configs, cfg.model)
    watch = Stopwatch()
    session = load_session(cfg, watch, quantizer, evaluation)
    dense = prepare_repair(repair, session, watch)
    for index, (stats, model) in enumerate(walk(method, session, configs, watch)):
        point = points[index]
        if done[point.key]:
            log.info("point %s already recorded; not evaluated again", point.key)
            continue
        if not claimed(point, held, done):
            continue
        check_cut(point, stats, session.layers_before)
        check_finite(model, "compression")
        with files.naming_full_disk(point.output_dir):
            save_artifacts(getattr(method, "artifacts", {}), point.output_dir, stats.get("merges"))
        last = index == len(points) - 1
        in_place = last or not getattr(method, "nested", False)
        repaired, stats = repair_point(repair, dense, model, stats, session, watch, in_place)
        done[point.key] = finish_point(point, repaired, stats, session, watch, last)
        finished.add(point.key)
        if held is not None:
            held.release(point.key)


def check_cut(point: Point, stats: dict, total: int) -> None:
    """A layer method removed exactly the layers its point asks for: a record must never carry
    one cut under another's label (a one-point curve once did)."""
    removed = stats.get("removed_layers")
    if removed is None:
        return
    wanted = point_count(point.cfg, total)
    if len(removed) != wanted:
        raise RuntimeError(
            f"method removed {len(removed)} layers {removed} where the point asks for {wanted} "
            f"of {total} (method.ratio={point.cfg.method.get('ratio')}); nothing is recorded"
        )


def load_session(cfg: DictConfig, watch: Stopwatch, quantizer, evaluation) -> Session:
    with watch.stage("load"):
        loaded = instantiate(cfg.model)
        check_finite(loaded.model, "load")
    with watch.stage("calibrate"):
        calib = instantiate(cfg.calib, tokenizer=loaded.tokenizer)
    model = loaded.model
    return Session(
        loaded.name,
        model,
        loaded.tokenizer,
        calib,
        num_layers(model),
        parameter_count(model),
        quantizer,
        evaluation,
    )


def walk(method, session: Session, configs: list[DictConfig], watch: Stopwatch) -> Iterator[tuple]:
    """(method stats, model) after each point, in order. Nested methods cut the one loaded model
    further at each point; the others compress a fresh copy of the dense model per point."""
    model, calib = session.model, session.calib
    if len(configs) == 1:
        with watch.stage("compress"):
            stats = method.compress(model, calib)
        yield stats, model
    elif getattr(method, "nested", False):
        counts = [point_count(c, session.layers_before) for c in configs]
        steps = method.progressive(model, calib, counts)
        for _ in configs:
            with watch.stage("compress"):
                _, stats = next(steps)
            yield stats, model
    else:
        dense = copy.deepcopy(model)
        for point_cfg in configs:
            with watch.stage("compress"):
                model = copy.deepcopy(dense)
                stats = instantiate(point_cfg.method).compress(model, calib)
            yield stats, model


def prepare_repair(repair, session: Session, watch: Stopwatch):
    """What the repair needs from the dense model (its hidden states), before any method runs."""
    if isinstance(repair, NoRepair):
        return None
    with watch.stage("repair_capture"):
        return repair.prepare(session.model, session.calib)


def repair_point(
    repair, dense, model, stats: dict, session: Session, watch: Stopwatch, in_place: bool
) -> tuple:
    """(model, stats) after the repair; a nested curve repairs a copy, never the model it cuts."""
    if dense is None:
        return model, stats
    with watch.stage("repair"):
        target = model if in_place else copy.deepcopy(model)
        repair_stats = repair.repair(target, session.calib, stats, dense)
    check_finite(target, "repair")
    return target, {**stats, "repair": repair_stats}


def point_count(point_cfg: DictConfig, total: int) -> int:
    method = point_cfg.method
    return layers_to_remove(total, method.get("ratio"), method.get("num_layers"))


TRACKERS: dict[str, Any] = {}


def shared_tracker(logger_cfg: DictConfig):
    """One tracker per process and logger config: a curve's points and a basic-launcher sweep's
    jobs share it, so an unreachable wandb server is found out once, not at every point."""
    key = OmegaConf.to_yaml(logger_cfg, resolve=True)
    if key not in TRACKERS:
        TRACKERS[key] = instantiate(logger_cfg)
    return TRACKERS[key]


def finish_point(
    point: Point, model, stats: dict, session: Session, watch: Stopwatch, last: bool
) -> dict:
    """Quantize, save, evaluate and record one point; tracking may fail, the record may not."""
    with files.naming_full_disk(point.output_dir):
        point.output_dir.mkdir(parents=True, exist_ok=True)
        tracker = shared_tracker(point.cfg.logger)
        tracker.start(point.config, name=run_name(point.cfg), output_dir=point.output_dir)
    try:
        with files.naming_full_disk(point.output_dir):  # the saved model, the tracker's files
            record = measure_point(point, model, stats, session, watch, last)
        copy = point.output_dir / "results.json"
        table.save_record(Path(point.cfg.paths.records_dir), record, copy=copy)
        records.clear_failure(Path(point.cfg.paths.records_dir), point.key)
        tracker.log_record(record, images=record_images(point.output_dir))
    finally:
        tracker.finish()
    print_summary(record)
    return record


def measure_point(
    point: Point, model, stats: dict, session: Session, watch: Stopwatch, last: bool
) -> dict:
    quantizer, layers_after = session.quantizer, num_layers(model)
    with watch.stage("quantize"):
        # Quantizing changes the model in place: a curve keeps cutting the unquantized one.
        target = model if last or isinstance(quantizer, NoQuant) else copy.deepcopy(model)
        target, quant_stats = quantizer.quantize(target, session.tokenizer, session.calib)
    if not isinstance(quantizer, NoQuant):
        check_finite(target, "quantization")
    record = {
        "model": session.name,
        "method": method_name(point.cfg),
        "quantizer": quantizer_name(point.cfg),
        "layers_before": session.layers_before,
        "layers_after": layers_after,
        "params_before": session.params_before,
        "params_after": parameter_count(target),
        "zero_fraction": zero_fraction(target),
        "weight_bits": quantizer.bits,
        "layer_ratio": 1 - layers_after / session.layers_before,
        "paper_compression_ratio": paper_compression_ratio(
            session.layers_before, layers_after, quantizer.bits
        ),
        "method_stats": {k: v for k, v in stats.items() if k != "repair"},
        "repair_stats": stats.get("repair", {}),
        "quant_stats": quant_stats,
        "calibration": {"name": session.calib.name, "samples": len(session.calib)},
    }
    if point.cfg.save:
        with watch.stage("save"):
            from mka_exp.models.saving import save_compressed

            model_dir = point.output_dir / "model"
            record["bytes_on_disk"] = save_compressed(target, session.tokenizer, model_dir)
    with watch.stage("evaluate"):
        metrics = {}
        if session.evaluation.tasks:
            metrics, rows = session.evaluation.evaluate(target, session.tokenizer)
            # lm-eval's per-example outcomes beside the record: the report's paired tests.
            records_dir = Path(point.cfg.paths.records_dir)
            record["samples"] = write_samples(records_dir, point.key, rows)
    record.update(metrics=metrics, timings=dict(watch.timings), **peak_memory())
    record.update(config_hash=point.key, config=point.config, code_version=records.code_version())
    return record
