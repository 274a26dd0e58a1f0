"""Benchmark: lm-eval on the in-memory model vs raw forward passes over the same batches.

    python benchmarks/eval_throughput.py [--random-model] [--tasks piqa hellaswag] [--limit 20]
                                         [--batch-size 16] [--repeats 1] [--threads 0] [--profile]

(a) lm-eval: `mka_exp.evaluation.hf.evaluate(model, tokenizer, tasks, limit=, batch_size=)`, timed as
    a whole (task building from the offline mirror, tokenization, batching, forward passes,
    log-softmax, scoring, metric aggregation). lm-eval's task index (~10 s, built once per
    process) and one untimed warm-up call (it also builds the tasks, which later calls with the
    same task list reuse) are excluded.
(b) raw: while (a) runs, every batch lm-eval feeds the model is recorded (a forward pre-hook
    clones `input_ids`); the same tensors are then replayed through `model(input_ids)` under
    `torch.no_grad()` exactly as lm-eval's `HFLM._model_call` calls it. Same model, same batch
    size, same token sequences, same padding.
(c) `evaluate(..., share_prefix=True)`, the default: `PrefixCacheHFLM` runs each shared token
    prefix once; same requests and metrics, fewer tokens through the model. (a) and (b) use
    lm-eval's plain HFLM (`share_prefix=False`).

`--prefix-cache`: a different comparison, in one run, per model (`--models`): MMLU 5-shot on
all 57 subjects (`--mmlu-limits`: questions per subject, one per model) and the paper's four 0-shot
tasks (`--zero-shot-limit`), each evaluated two ways: (1) plain `HFLM` (`share_prefix=False`),
(2) the prefix cache (`PrefixCacheHFLM`, the default: each shared token prefix once; the
"shared contexts" way of earlier runs, its superseded base class, is gone). Per way: wall and CPU
seconds (`time.process_time`), forwards and tokens through the model (input ids with padding, and without
padding: HFLM's unpadded rows, the cache's tree), against
the tokens requested (one sequence per request, as HFLM without its logits cache) and the bound
(the radix tree with every shared run split off, `prefix_min_shared=1`); metrics compared exactly.
Tasks are built once per workload before the timed calls (an untimed `limit=1` evaluation).

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
        self.build_s = (
            0.0  # inside mka_exp.evaluation.harness.load_tasks (lm-eval builds the tasks)
        )
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
    and `mka_exp.evaluation.harness.load_tasks` to time task building."""
    import lm_eval.models.huggingface as hf

    import mka_exp.evaluation.harness as ev

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
    from mka_exp.evaluation.hf import evaluate

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
                limit=args.limit,
                batch_size=args.batch_size,
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
    """Equality up to float noise (the prefix cache sums log-probs in another order)."""
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


WAYS = ("plain HFLM", "prefix cache")
ZERO_SHOT = ["piqa", "hellaswag", "race", "boolq"]


@contextlib.contextmanager
def way(name: str):
    """Make `evaluate(share_prefix=...)` build the LM of one of WAYS; record its requests."""
    import lm_eval.models.huggingface as hf

    import mka_exp.evaluation.prefix_cache as pc

    seen: list = []
    cls = hf.HFLM if name == "plain HFLM" else pc.PrefixCacheHFLM
    inner = cls._loglikelihood_tokens
    depth = [0]

    def recording(self, requests, *args, **kwargs):
        depth[0] += 1
        try:
            if depth[0] == 1:
                seen.append((self, list(requests)))
            return inner(self, requests, *args, **kwargs)
        finally:
            depth[0] -= 1

    cls._loglikelihood_tokens = recording
    try:
        yield seen
    finally:
        cls._loglikelihood_tokens = inner


def unpadded_tokens(name: str, seen: list) -> int:
    """Tokens each way runs without its padding, from the requests it got."""
    from mka_exp.evaluation.prefix_tree import build_tree, tree_tokens

    total = 0
    for lm, reqs in seen:
        if name == "plain HFLM":  # one row per context+continuation[:-1] (its logits cache)
            rows = {tuple((c + t)[-(lm.max_length + 1) :][:-1]) for _, c, t in reqs}
            total += sum(map(len, rows))
        else:
            total += tree_tokens(build_tree(reqs, lm.max_length, lm.min_shared)[0])
    return total


def request_counts(seen: list) -> tuple[int, int, int]:
    """(requests, tokens requested, bound: tokens of the fully split radix tree)."""
    from mka_exp.evaluation.prefix_tree import build_tree, requested_tokens, tree_tokens

    n = asked = bound = 0
    for lm, reqs in seen:
        n += len(reqs)
        asked += requested_tokens(reqs, lm.max_length)
        bound += tree_tokens(build_tree(reqs, lm.max_length, 1)[0])
    return n, asked, bound


def load_named(name: str):
    """SmolLM2 (the benchmark's safetensors copy) or a model config under conf/model/."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if name == "smollm2_135m":
        return load_model(False)
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{name}.yaml")
    return instantiate(cfg, device="cpu")


def compare_prefix_cache(args) -> None:
    from mka_exp.evaluation.hf import evaluate

    for model_name, mmlu_limit in zip(args.models, args.mmlu_limits, strict=True):
        lm = load_named(model_name)
        # The cheap 0-shot workload first: a run cut short still has its figures.
        workloads = [
            (f"0-shot x4, {args.zero_shot_limit} each", ZERO_SHOT, args.zero_shot_limit, {}, WAYS),
            (
                f"MMLU 5-shot, {mmlu_limit}/subject",
                args.mmlu_tasks,
                mmlu_limit,
                {t: 5 for t in args.mmlu_tasks},
                mmlu_ways(args.mmlu_ways),
            ),
        ]
        for title, tasks, limit, shots, ways in workloads:
            if not limit:  # --zero-shot-limit 0: MMLU only
                continue
            kwargs = dict(num_fewshot=shots, data_root=DATA_ROOT, batch_size=args.batch_size)
            evaluate(lm.model, lm.tokenizer, tasks, limit=1, **kwargs)  # builds the tasks, untimed
            rows, metrics = [], {}
            for name in ways:
                recorder = Recorder(lm.model)
                with way(name) as seen:
                    wall, cpu = time.perf_counter(), time.process_time()
                    metrics[name] = evaluate(
                        lm.model,
                        lm.tokenizer,
                        tasks,
                        limit=limit,
                        share_prefix=name != "plain HFLM",
                        **kwargs,
                    )
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                recorder.remove()
                padded = sum(int(b.numel()) for b in recorder.batches)
                rows.append(
                    (name, wall, cpu, len(recorder.batches), padded, unpadded_tokens(name, seen))
                )
                counts = request_counts(seen)
            print_comparison(model_name, title, rows, counts, metrics, tasks)
        del lm


def mmlu_ways(short: list[str]) -> tuple[str, ...]:
    """The WAYS named by `--mmlu-ways` (plain HFLM always, first: it is the baseline)."""
    names = {"hflm": WAYS[0], "prefix": WAYS[1]}
    return (WAYS[0], *(names[w] for w in short if w != "hflm"))


def print_comparison(model_name, title, rows, counts, metrics, tasks) -> None:
    n, asked, bound = counts
    plain_wall, plain_tokens = rows[0][1], rows[0][5]
    print(
        f"\n{model_name}, {title}: {n} requests, {asked} tokens requested, "
        f"bound {bound} ({plain_tokens / bound:.2f}x fewer than plain HFLM runs)"
    )
    head = (
        f"{'':<17}{'wall s':>8}{'CPU s':>8}{'forwards':>9}{'tokens':>9}{'padded':>9}"
        f"{'speed-up':>9}{'of bound':>9}  metrics"
    )
    print(head + "\n" + "-" * len(head))
    for name, wall, cpu, forwards, padded, tokens in rows:
        speedup = plain_wall / wall
        same = exact(metrics[name], metrics["plain HFLM"])
        print(
            f"{name:<17}{wall:>8.1f}{cpu:>8.1f}{forwards:>9}{tokens:>9}{padded:>9}"
            f"{speedup:>8.2f}x{speedup / (plain_tokens / bound):>9.0%}  {same}"
        )
    scores = {
        k: round(v, 4)
        for k, v in metrics["plain HFLM"].items()
        if "stderr" not in k and k.split("/")[0] in tasks
    }
    print(f"metrics (plain HFLM): {scores}")


def exact(got: dict, want: dict) -> str:
    """'identical' (every metric, stderr included, equal as floats) or what differs."""
    if got == want:
        return "identical"
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    close = got == pytest_approx(want)
    return f"{len(diff)} differ ({'within 1e-9' if close else 'NOT close'}): {diff[:3]}"


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
    parser.add_argument("--prefix-cache", action="store_true", help="the three-way comparison")
    parser.add_argument("--models", nargs="+", default=["smollm2_135m"])
    parser.add_argument("--mmlu-limits", nargs="+", type=int, default=[10], help="per model")
    parser.add_argument("--mmlu-tasks", nargs="+", default=["mmlu"], help="e.g. mmlu_anatomy")
    parser.add_argument("--zero-shot-limit", type=int, default=20, help="0: skip the 0-shot tasks")
    parser.add_argument(
        "--mmlu-ways",
        nargs="+",
        choices=["hflm", "prefix"],
        default=["hflm", "prefix"],
        help="ways timed on MMLU (plain HFLM always)",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    if args.prefix_cache:
        compare_prefix_cache(args)
        return

    from mka_exp.evaluation.harness import known_tasks
    from mka_exp.evaluation.hf import evaluate

    lm = load_model(args.random_model)
    model, tokenizer = lm.model, lm.tokenizer
    start = time.perf_counter()
    known_tasks()
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(model, tokenizer, args.tasks, limit=2, batch_size=args.batch_size, data_root=DATA_ROOT)
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
    print(f"{'(c) evaluate(), prefix cache':<34}{shared_s:>9.2f}{scored / shared_s:>10.1f}")
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
