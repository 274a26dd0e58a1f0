"""Resume: which points of a run are recorded already, which failed before, which another run
is computing (its claim), and what to say of them when a run stops.

A point (`Point`) is one config of a run: a single run has one, a curve one per ratio. Its
record, keyed by its config hash, is the only proof that it is done; a failure marker only says
why a resume tries it again. Used by the pipeline; may import `results`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mka_exp.results import claims, records, table

log = logging.getLogger("mka_exp.pipeline")  # its lines read as the run's, as before


def progress(points: list[Point], records_dir: Path) -> str:
    """Which points are recorded and which are not, read from the records on disk."""
    done = [p for p in points if records.record_path(records_dir, p.key).exists()]
    todo = [p for p in points if p not in done]
    labels = (lambda ps: ", ".join(p.label for p in ps)) if len(points) > 1 else None
    head = f"{len(done)} of {len(points)} point(s) recorded"
    if labels is None:
        return head + (f" ({points[0].key})" if done else "")
    return head + (f": {labels(done)}" if done else "") + (f"; not done: {labels(todo)}" if todo
                                                            else "")  # fmt: skip


@dataclass
class Point:
    """One point of a run: its own config, hash and output directory."""

    cfg: DictConfig
    config: dict
    key: str
    output_dir: Path

    @property
    def label(self) -> str:
        """How a message names the point: its curve ratio, else its config hash."""
        ratio = self.cfg.method.get("ratio")
        return f"ratio {ratio}" if self.output_dir.name.startswith("ratio_") else self.key


def mark_failed(records_dir: Path, points: list[Point], line: str) -> None:
    """A failure marker per unfinished point; on a full disk as many as fit (they only say why
    a resume retries the point)."""
    for point in points:
        try:
            records.save_failure(records_dir, point.key, line, point.config)
        except OSError:
            return


def recorded_points(resume: bool, points: list[Point], records_dir: Path) -> dict:
    """Each point's record if it is already finished (resume), else None; with `resume=false`
    all None (computed again, records overwritten). A recorded point's run directory gets a copy
    of its record, and the table its row (a damaged table is rebuilt from the records)."""
    if not resume:
        old = [p.key for p in points if records.record_path(records_dir, p.key).exists()]
        if old:
            log.info("resume=false: computing %d recorded point(s) again and overwriting their "
                     "records: %s", len(old), ", ".join(old))  # fmt: skip
        return dict.fromkeys((p.key for p in points), None)
    done = {p.key: records.load_record(records_dir, p.key) for p in points}
    table.upsert_rows(records_dir, [r for r in done.values() if r], replace=False)
    for point in points:
        if done[point.key]:
            table.save_copy(records_dir, point.output_dir / "results.json", done[point.key])
        elif failure := records.load_failure(records_dir, point.key):
            log.info("point %s failed before (%s); trying it again", point.key, failure["error"])
    return done


def claimed(point: Point, held: claims.Claims | None, done: dict) -> bool:
    """Whether this run computes the point now: it claimed it (or shares no work). A point
    recorded meanwhile by another run goes into `done`; one it is computing is left for later."""
    if held is None:
        return True
    state = held.take(point.key)
    if state == claims.DONE:
        done[point.key] = records.load_record(held.records_dir, point.key)
        log.info("point %s was recorded by another run meanwhile", point.label)
        return False
    if state != claims.OURS:
        log.info("point %s is being computed by %s; this run goes on and waits for it at its end",
                 point.label, claims.holder(state))  # fmt: skip
        return False
    return True
