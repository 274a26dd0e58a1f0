"""The process a run lives in: SIGTERM/SIGINT turned into a clean stop (`Interrupted`), seconds
per stage (`Stopwatch`) and peak memory. No config, no model: the pipeline uses these around
its stages. May import: nothing of mka_exp.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("mka_exp.pipeline")  # the stage lines read as the pipeline's, as before


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt: no `except Exception`
    on its way marks the abandoned point as failed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.progress = "no point of this run was recorded"

    def line(self) -> str:
        return (
            f"{self}: stopped; the point being computed was abandoned, nothing of it recorded; "
            f"{self.progress}. Resume: run the same command again (finished points are skipped)"
        )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` in the main thread; a second one while stopping is
    ignored, so the stop stays one line. A launcher's own handler of a warning signal
    (`warned_by`) that ends the job also becomes `Interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    for sig in WARNING_SIGNALS:
        handler = signal.getsignal(sig)
        if callable(handler):
            previous[sig] = signal.signal(sig, warned_by(handler, stop))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def warned_by(handler: Any, stop: Any) -> Any:
    """submitit's handler of Slurm's warning signal (SIGUSR2, `signal_delay_s` before a time limit)
    requeues the job and exits, or at a time limit raises `UncompletedJobError`, wherever the run
    is: that error would be recorded as a failure of every unfinished point. Whatever the handler
    raises stops the run instead, like SIGTERM; a handler that returns lets the run go on."""

    def warned(signum: int, frame: Any) -> None:
        try:
            handler(signum, frame)
        except BaseException:
            stop(signum, frame)

    return warned


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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
