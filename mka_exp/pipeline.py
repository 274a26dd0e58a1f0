"""The recipe: load → calibrate → compress → quantize → (save) → evaluate → record.

This is the only module that reads the Hydra config; every component it builds takes plain
arguments. `main(cfg)` is what `run.py` calls: it turns a user error into one clear line and a
non-zero exit; `run(cfg)` returns the run record (tests call it directly).

A run is a list of points: one for a plain run, several for `curve=[r1, r2, ...]`. A curve point's
config is exactly the single run's config at that ratio, so both share one config hash: a point
finished either way is never computed again (resume), and the records are interchangeable.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mka_exp import results, sweep
from mka_exp.evaluation import evaluate_with_samples
from mka_exp.layers import num_layers
from mka_exp.methods.base import layers_to_remove
from mka_exp.quantizers import NoQuant
from mka_exp.quantizers.accounting import paper_compression_ratio, parameter_count, zero_fraction
from mka_exp.repair.none import NoRepair
from mka_exp.samples import write_samples

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotImplementedError, RuntimeError)


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry point behind `@hydra.main`: one line and exit code 2 on bad input. In a multirun a
    failed job is reported (its error line and overrides) and the sweep goes on; the sweep exits
    1 at its end with a summary (`mka_exp.sweep.FailureSummary`)."""
    try:
        return run(cfg)
    except Exception as err:
        expected = isinstance(err, (InstantiationException, *USER_ERRORS))
        if sweep.in_multirun():
            sweep.job_failed(Path(cfg.paths.output_dir), sweep.error_line(err), err, expected)
            return None
        if not expected:
            raise
        log.error("%s", sweep.error_line(err))
        raise SystemExit(2) from None


class Stopwatch:
    """Seconds per pipeline stage (the latest run of each stage)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        log.info("stage %s done in %.1f s", name, self.timings[name])


def peak_memory() -> dict[str, int]:
    """Peak process RSS, and peak CUDA memory when a GPU was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"peak_memory_bytes": gpu or rss, "peak_rss_bytes": rss, "peak_gpu_bytes": gpu}


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
    check_config(cfg)
    return run_points(cfg, curve_points(cfg))[-1]


def check_config(cfg: DictConfig) -> None:
    """Every check that needs no model, before anything loads or is written: one line per bad
    setting, all at once (`mka_exp/checks.py`). The benchmark files are read in `check_tasks`."""
    from mka_exp import checks
    from mka_exp.calibration import check_against_eval
    from mka_exp.data import check_data_root
    from mka_exp.models import DTYPES
    from mka_exp.tracking import WANDB_MODES

    checks.check_missing(OmegaConf.missing_keys(cfg))
    c = OmegaConf.to_container(cfg, resolve=True)
    ev, model, method, calib = c["eval"], c["model"], c["method"], c["calib"]
    checks.gather(
        lambda: checks.check_seed(c.get("seed")),
        lambda: checks.check_eval(ev["tasks"], ev["limit"], ev["batch_size"], ev["num_fewshot"]),
        lambda: checks.check_positive("eval.prefix_cache_tokens", ev.get("prefix_cache_tokens", 1)),
        lambda: checks.check_positive("eval.prefix_min_shared", ev.get("prefix_min_shared", 1)),
        lambda: checks.check_logger_mode(c["logger"].get("mode"), WANDB_MODES),
        lambda: checks.check_writable_dir("paths.records_dir", c["paths"]["records_dir"]),
        lambda: check_data_root(c.get("data_root")),
        lambda: checks.check_calibration(str(calib.get("_target_")).rsplit(".", 1)[-1], calib),
        lambda: check_against_eval(calib, ev),
        lambda: checks.check_device(model.get("device", "auto")),
        lambda: checks.check_dtype(model.get("dtype", "auto"), DTYPES),
        lambda: checks.check_amount(method.get("ratio"), method.get("num_layers")),
        lambda: check_curve_methods(cfg, c.get("curve")),
    )


def check_curve_methods(cfg: DictConfig, curve: Any) -> None:
    """`curve` is a non-empty list and the method accepts each of its ratios."""
    from mka_exp import checks

    checks.check_curve(curve, "ratio" in cfg.method)
    reset = {"num_layers": None} if "num_layers" in cfg.method else {}
    for ratio in curve or []:
        try:
            instantiate(cfg.method, ratio=ratio, **reset)
        except InstantiationException as err:
            raise ValueError(f"curve={curve}: {err.__cause__ or err}") from None


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
    quantizer: Any
    eval_kwargs: dict


@dataclass
class Point:
    """One point of a run: its own config, hash and output directory."""

    cfg: DictConfig
    config: dict
    key: str
    output_dir: Path


def plan_points(cfg: DictConfig, configs: list[DictConfig]) -> list[Point]:
    base = Path(cfg.paths.output_dir)
    points = []
    for point_cfg in configs:
        config = OmegaConf.to_container(point_cfg, resolve=True)
        out = base if len(configs) == 1 else base / f"ratio_{point_cfg.method.ratio}"
        points.append(Point(point_cfg, config, results.config_hash(config), out))
    return points


def run_points(cfg: DictConfig, configs: list[DictConfig]) -> list[dict[str, Any]]:
    """Load once, walk the points in order; points already recorded are not evaluated again."""
    records_dir = Path(cfg.paths.records_dir)
    points = plan_points(cfg, configs)
    done = recorded_points(cfg, points, records_dir)
    if all(done.values()):
        log.info("all %d point(s) already recorded in %s; skipping", len(points), records_dir)
        return [done[p.key] for p in points]
    finished: set[str] = set()
    try:
        return compute_points(cfg, configs, points, done, finished)
    except Exception as err:  # each unfinished point is marked; the next resume retries it
        for point in points:
            if not done[point.key] and point.key not in finished:
                results.save_failure(records_dir, point.key, sweep.error_line(err), point.config)
        raise


def recorded_points(cfg: DictConfig, points: list[Point], records_dir: Path) -> dict:
    """Each point's record if it is already finished (resume), else None; with `resume=false`
    all None (computed again, records overwritten). A recorded point's run directory gets a copy
    of its record, and the table its row (a damaged table is rebuilt from the records)."""
    if not cfg.get("resume", True):
        old = [p.key for p in points if results.record_path(records_dir, p.key).exists()]
        if old:
            log.info("resume=false: computing %d recorded point(s) again and overwriting their "
                     "records: %s", len(old), ", ".join(old))  # fmt: skip
        return dict.fromkeys((p.key for p in points), None)
    done = {p.key: results.load_record(records_dir, p.key) for p in points}
    results.upsert_rows(records_dir, [r for r in done.values() if r], replace=False)
    for point in points:
        if done[point.key]:
            results.save_copy(records_dir, point.output_dir / "results.json", done[point.key])
        elif failure := results.load_failure(records_dir, point.key):
            log.info("point %s failed before (%s); trying it again", point.key, failure["error"])
    return done


def compute_points(
    cfg: DictConfig, configs: list[DictConfig], points: list[Point], done: dict, finished: set
) -> list[dict[str, Any]]:
    """Load once and compute the points not in `done`, adding each finished key to `finished`."""
    torch.manual_seed(cfg.seed)
    # The first point's method: for a one-point curve the top-level config still holds the
    # yaml's ratio, and a method built from it cut at that ratio under the point's label.
    method = instantiate(configs[0].method)  # bad values fail before the model loads
    repair = instantiate(cfg.repair) if "repair" in cfg else NoRepair()
    repair.check_method(method)
    quantizer, eval_kwargs = instantiate(cfg.quant), OmegaConf.to_container(cfg.eval, resolve=True)
    check_tasks(eval_kwargs)
    watch = Stopwatch()
    session = load_session(cfg, watch, quantizer, eval_kwargs)
    dense = prepare_repair(repair, session, watch)
    records = []
    for index, (stats, model) in enumerate(walk(method, session, configs, watch)):
        point = points[index]
        if done[point.key]:
            log.info("point %s already recorded; not evaluated again", point.key)
            records.append(done[point.key])
            continue
        check_cut(point, stats, session.layers_before)
        save_artifacts(getattr(method, "artifacts", {}), point.output_dir, stats.get("merges"))
        last = index == len(points) - 1
        in_place = last or not getattr(method, "nested", False)
        repaired, stats = repair_point(repair, dense, model, stats, session, watch, in_place)
        records.append(finish_point(point, repaired, stats, session, watch, last))
        finished.add(point.key)
    return records


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


def check_tasks(eval_kwargs: dict) -> None:
    """Unknown task names (with close matches), few-shot names and a bad line in a benchmark file
    fail before the model loads: the tasks are built (read) now and reused by the evaluation."""
    from mka_exp.checks import check_eval_data

    check_eval_data(eval_kwargs["tasks"], eval_kwargs["num_fewshot"], eval_kwargs["data_root"])


def load_session(cfg: DictConfig, watch: Stopwatch, quantizer, eval_kwargs: dict) -> Session:
    with watch.stage("load"):
        loaded = instantiate(cfg.model)
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
        eval_kwargs,
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
    point.output_dir.mkdir(parents=True, exist_ok=True)
    tracker = shared_tracker(point.cfg.logger)
    tracker.start(point.config, name=run_name(point.cfg), output_dir=point.output_dir)
    try:
        record = measure_point(point, model, stats, session, watch, last)
        copy = point.output_dir / "results.json"
        results.save_record(Path(point.cfg.paths.records_dir), record, copy=copy)
        results.clear_failure(Path(point.cfg.paths.records_dir), point.key)
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
            from mka_exp.saving import save_compressed

            model_dir = point.output_dir / "model"
            record["bytes_on_disk"] = save_compressed(target, session.tokenizer, model_dir)
    with watch.stage("evaluate"):
        kwargs, metrics = session.eval_kwargs, {}
        if kwargs["tasks"]:
            metrics, rows = evaluate_with_samples(target, session.tokenizer, **kwargs)
            # lm-eval's per-example outcomes beside the record: the report's paired tests.
            records_dir = Path(point.cfg.paths.records_dir)
            record["samples"] = write_samples(records_dir, point.key, rows)
    record.update(metrics=metrics, timings=dict(watch.timings), **peak_memory())
    record.update(config_hash=point.key, config=point.config, code_version=results.code_version())
    return record


def save_artifacts(
    artifacts: dict[str, Any], output_dir: Path, merges: list[dict] | None = None
) -> None:
    """Each matrix a method left behind, as .npy and as a heatmap PNG (paper Fig. 3), with the
    merged pairs (MKA's `merges`) marked."""
    import numpy as np

    from mka_exp.plots import merge_marks, similarity_heatmap

    output_dir.mkdir(parents=True, exist_ok=True)
    for name, matrix in artifacts.items():
        array = np.asarray(matrix)
        np.save(output_dir / f"{name}.npy", array)
        marks = merge_marks(name, array, merges)
        similarity_heatmap(array, output_dir / f"{name}.png", name.replace("_", " "), **marks)


def record_images(output_dir: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(output_dir.glob("*.png"))}


def print_summary(record: dict[str, Any]) -> None:
    """The run's results as a small table on stdout."""
    import pandas as pd

    metrics = {k: v for k, v in record.get("metrics", {}).items() if "stderr" not in k}
    head = {
        "model": record["model"],
        "method": record["method"],
        "layers": f"{record['layers_before']}→{record['layers_after']}",
        "params": f"{record['params_before']:,}→{record['params_after']:,}",
        **{k: round(v, 4) for k, v in metrics.items() if not k.startswith("mmlu_")},
    }
    print(pd.DataFrame([head]).to_string(index=False))
