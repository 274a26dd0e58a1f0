"""Benchmark: lm-eval on the in-memory model vs raw forward passes over the same batches.

    python benchmarks/eval_throughput.py [--random-model] [--tasks piqa hellaswag] [--limit 20]
                                         [--batch-size 16] [--repeats 1] [--threads 0] [--profile]

(a) lm-eval: `mka_exp.evaluation.evaluate(model, tokenizer, tasks, limit, batch_size)`, timed as
    a whole (task building from the offline mirror, tokenization, batching, forward passes,
    log-softmax, scoring, metric aggregation). lm-eval's task index (~10 s, built once per
    process) and one untimed warm-up call (it also builds the tasks, which later calls with the
    same task list reuse) are excluded.
(b) raw: while (a) runs, every batch lm-eval feeds the model is recorded (a forward pre-hook
    clones `input_ids`); the same tensors are then replayed through `model(input_ids)` under
    `torch.no_grad()` exactly as lm-eval's `HFLM._model_call` calls it. Same model, same batch
    size, same token sequences, same padding.
(c) `evaluate(..., share_prefix=True)`, the default: `SharedPrefixHFLM` runs each multiple-choice
    context once; same requests and metrics, fewer tokens through the model. (a) and (b) use
    lm-eval's plain HFLM (`share_prefix=False`).

Tokens counted are the tokens lm-eval scores: the unpadded length of every request row
(context + continuation minus the last token), read from lm-eval's own `pad_and_concat` call;
padded tokens are shown too. tokens/s = scored tokens / seconds; the ratio (a)/(b) is the share
of raw forward-pass throughput lm-eval reaches. Also printed: how much of (a) is spent inside
the model's forward, and (`--profile`) cProfile's top entries of one lm-eval call.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activation_capture import DATA_ROOT, load_model, set_threads  # noqa: E402


class Recorder:
    """Records the model's input batches and the time spent inside its forward."""

    def __init__(self, model) -> None:
        self.batches: list[torch.Tensor] = []
        self.scored_tokens = 0
        self.forward_s = 0.0
        self.build_s = 0.0  # inside mka_exp.evaluation.load_tasks (lm-eval builds the tasks)
        self._start = 0.0
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.batches.append(ids.detach().clone())
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.forward_s += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def instrument(recorder: Recorder):
    """Wrap lm-eval's `pad_and_concat` (HFLM builds each batch with it) to count unpadded rows,
    and `mka_exp.evaluation.load_tasks` to time task building."""
    import lm_eval.models.huggingface as hf

    import mka_exp.evaluation as ev

    pad_and_concat, load_tasks = hf.pad_and_concat, ev.load_tasks

    def counting(max_length, tensors, *args, **kwargs):
        recorder.scored_tokens += sum(int(t.shape[-1]) for t in tensors)
        return pad_and_concat(max_length, tensors, *args, **kwargs)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return load_tasks(*args, **kwargs)
        finally:
            recorder.build_s += time.perf_counter() - start

    hf.pad_and_concat, ev.load_tasks = counting, timed
    try:
        yield
    finally:
        hf.pad_and_concat, ev.load_tasks = pad_and_concat, load_tasks


def run_lm_eval(model, tokenizer, args, profile: bool = False, share_prefix: bool = False):
    """One timed evaluate() call with recording; returns (seconds, recorder, metrics, stats)."""
    from mka_exp.evaluation import evaluate

    recorder = Recorder(model)
    profiler = cProfile.Profile() if profile else None
    try:
        with instrument(recorder):
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            metrics = evaluate(
                model,
                tokenizer,
                args.tasks,
                args.limit,
                args.batch_size,
                data_root=DATA_ROOT,
                share_prefix=share_prefix,
            )
            if profiler:
                profiler.disable()
            seconds = time.perf_counter() - start
    finally:
        recorder.remove()
    return seconds, recorder, metrics, profiler


def run_raw(model, batches: list[torch.Tensor]) -> float:
    """Replay the recorded batches as HFLM._model_call does: model(input_ids).logits."""
    start = time.perf_counter()
    with torch.no_grad():
        for ids in batches:
            model(ids).logits  # noqa: B018
    return time.perf_counter() - start


def pytest_approx(metrics: dict[str, float]):
    """Equality up to float noise (the shared-context path sums log-probs in another order)."""
    import pytest

    return pytest.approx(metrics, abs=1e-9)


def profile_text(profiler: cProfile.Profile, top: int) -> str:
    """Top entries by own time, then lm-eval / mka_exp / datasets functions by cumulative time."""
    parts = []
    for key, restrict in (("tottime", ()), ("cumulative", (r"lm_eval|mka_exp|datasets",))):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(*restrict, top)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        parts.append(f"by {key}:\n" + "\n".join(lines[start : start + top + 1]))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-model", action="store_true", help="12-layer random Llama")
    parser.add_argument("--tasks", nargs="+", default=["piqa", "hellaswag"])
    parser.add_argument("--limit", type=int, default=20, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="(a) then (b), min of each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--profile", action="store_true", help="cProfile one lm-eval call")
    parser.add_argument("--top", type=int, default=15, help="profile entries shown")
    args = parser.parse_args()
    set_threads(args.threads)

    from mka_exp.evaluation import evaluate, known_tasks

    lm = load_model(args.random_model)
    model, tokenizer = lm.model, lm.tokenizer
    start = time.perf_counter()
    known_tasks()
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(model, tokenizer, args.tasks, 2, args.batch_size, data_root=DATA_ROOT)
    warmup_s = time.perf_counter() - start

    lm_times, raw_times, forward_times, build_times, shared_times = [], [], [], [], []
    for _ in range(args.repeats):
        seconds, rec, metrics, _ = run_lm_eval(model, tokenizer, args)
        lm_times.append(seconds)
        forward_times.append(rec.forward_s)
        build_times.append(rec.build_s)
        raw_times.append(run_raw(model, rec.batches))
        seconds, _, shared_metrics, _ = run_lm_eval(model, tokenizer, args, share_prefix=True)
        shared_times.append(seconds)
    profiler = run_lm_eval(model, tokenizer, args, profile=True)[3] if args.profile else None

    lm_s, raw_s, shared_s = min(lm_times), min(raw_times), min(shared_times)
    fwd_s, build_s = min(forward_times), min(build_times)
    scored = rec.scored_tokens
    padded = sum(int(b.numel()) for b in rec.batches)
    name = "random Llama (12 layers)" if args.random_model else "SmolLM2-135M"
    print(
        f"\nmodel: {name}; tasks {args.tasks}, limit {args.limit}, batch size {args.batch_size}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"{len(rec.batches)} forward batches, {scored} scored tokens "
        f"({padded} with padding, {scored / padded:.0%} useful)"
    )
    print(
        f"one-time: lm-eval task index {index_s:.1f} s; warm-up evaluate(limit=2) {warmup_s:.1f} s"
    )
    head = f"{'':<34}{'seconds':>9}{'tokens/s':>10}"
    print(head + "\n" + "-" * len(head))
    print(f"{'(a) lm-eval evaluate()':<34}{lm_s:>9.2f}{scored / lm_s:>10.1f}")
    print(f"{'    of which inside model.forward':<34}{fwd_s:>9.2f}")
    print(f"{'    of which building the tasks':<34}{build_s:>9.2f}")
    print(f"{'    of which the rest of lm-eval':<34}{lm_s - fwd_s - build_s:>9.2f}")
    print(f"{'(b) raw forward, same batches':<34}{raw_s:>9.2f}{scored / raw_s:>10.1f}")
    print(f"ratio (a)/(b) tokens/s: {raw_s / lm_s:.1%} of raw (goal >= 70%)")
    print(f"  without task building: {raw_s / (lm_s - build_s):.1%} of raw")
    print(f"{'(c) evaluate(), shared contexts':<34}{shared_s:>9.2f}{scored / shared_s:>10.1f}")
    print(
        f"ratio (c)/(a): {lm_s / shared_s:.2f}x faster than lm-eval's HFLM, "
        f"{raw_s / shared_s:.1%} of (b)'s raw tokens/s (same requests scored); "
        f"metrics equal to (a): {shared_metrics == pytest_approx(metrics)}"
    )
    if args.repeats > 1:
        print(f"all repeats: lm-eval {lm_times}, raw {raw_times}")
    scores = {k: round(v, 4) for k, v in metrics.items() if "stderr" not in k}
    print(f"metrics: {scores}")
    if profiler:
        print(f"\ncProfile of one lm-eval call, top {args.top} by own time:")
        print(profile_text(profiler, args.top))


if __name__ == "__main__":
    main()
