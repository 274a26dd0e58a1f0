"""Benchmark (issue 29): a grid of compressed variants evaluated with and without reuse across
models, in one run.

    OMP_NUM_THREADS=1 python benchmarks/eval_reuse.py [--model smollm2_135m] [--tasks piqa hellaswag]
        [--limit 50] [--task-limit mmlu=3 ...] [--num-layers 4]
        [--methods reverse_prune mka reverse_prune+linear] [--batch-size 8] [--jobs 1]
        [--profile reuse.pstats]

The grid: the dense model (the reference) and each method removing `--num-layers` layers
(`conf/method/<m>.yaml` defaults; the methods calibrate on 16 MMLU prompts); `<method>+linear`
is that method followed by the linear repair (`conf/repair/linear.yaml` defaults, fitted on the
same prompts). `--task-limit task=N` gives a task its own limit (one evaluation per limit; the
table sums them). The stored layers are the ones the grid needs: for each variant the deepest k
whose fingerprint is the dense model's. Both ways evaluate the same grid with the prefix cache;
reuse writes into a fresh store. `--jobs 2` runs two evaluations at once in forked workers, plain
and reuse ones interleaved (the reuse variants once the reference has filled the store), each
timed by its own CPU clock. Printed per model and in all: CPU seconds, (tokens x layers) run,
bytes stored (with `--jobs` > 1, when that run ended), the bound (the fraction of layer x token
work that is new in the variant: (n - k) / n), the bound with the LM head (which runs on every
scored position of every model, reuse or not), the measured CPU ratio, and whether predictions
are identical and the largest |delta log p|. `--profile` then evaluates the first variant once
more with reuse (after the timed grid, so the table is not slowed) under cProfile, writes the
stats there and prints the top functions.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_capture import DATA_ROOT, calibration, set_threads  # noqa: E402


def load(name: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    return instantiate(cfg, device="cpu")


def variants(loaded, methods: list[str], num_layers: int) -> dict:
    """`{name: model}`: the dense model and each method's compressed copy."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    grid = {"dense": loaded.model}
    calib = calibration(loaded.tokenizer, prompts=16, max_length=128, batch_size=8)
    for name in methods:
        method, _, repair = name.partition("+")
        cfg = OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml")
        cfg.ratio, cfg.num_layers = None, num_layers
        if "cache" in cfg:
            cfg.cache = None
        model = copy.deepcopy(loaded.model)
        if repair:  # as the pipeline does: the dense copy first, the method, then the fits
            fixer = instantiate(OmegaConf.load(ROOT / "conf" / "repair" / f"{repair}.yaml"))
            dense = fixer.prepare(model, calib)
        stats = instantiate(cfg).compress(model, calib)
        if repair:
            fixer.repair(model, calib, stats, dense)
        grid[name] = model
    return grid


def shared_depths(grid: dict) -> tuple[dict, float]:
    """Each model's deepest k with the dense model's fingerprint, and the seconds the dense
    model's fingerprints took (hashing every layer once)."""
    from mka_exp.fingerprints import fingerprints
    from mka_exp.layers import num_layers

    dense = grid["dense"]
    start = time.process_time()
    ref = fingerprints(dense, num_layers(dense) - 1)
    seconds = time.process_time() - start
    depths = {}
    for name, model in grid.items():
        own = fingerprints(model, num_layers(model) - 1)
        depths[name] = max(k for k in range(len(own)) if k < len(ref) and own[k] == ref[k])
    return depths, seconds


def task_groups(args) -> dict:
    """`{limit: [tasks]}`: `--task-limit` entries apart, the rest at `--limit`."""
    own = dict(item.split("=", 1) for item in args.task_limit)
    groups: dict[int, list[str]] = {}
    for task in args.tasks:
        groups.setdefault(int(own.get(task, args.limit)), []).append(task)
    return groups


def evaluate(model, tokenizer, args, **reuse) -> dict:
    """One evaluation per limit group; CPU time, rows and counters summed over them."""
    from collections import Counter

    from mka_exp.evaluation.hf import HFEvaluation

    out = {"cpu": 0.0, "metrics": {}, "rows": [], "stats": Counter()}
    for limit, tasks in task_groups(args).items():
        backend = HFEvaluation(tasks=tasks, limit=limit, data_root=DATA_ROOT,
                               batch_size=args.batch_size, **reuse)  # fmt: skip
        start = time.process_time()
        metrics, rows = backend.evaluate(model, tokenizer)
        out["cpu"] += time.process_time() - start
        out["metrics"].update(metrics)
        out["rows"].append(rows)
        stats = dict(backend.last_lm.stats)
        out["start"] = stats.pop("reuse_start", 0)  # the same for every group: the model's
        out["stats"].update(stats)
    return out


def store_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.glob("*/*.bin"))


def compare(a, b) -> tuple[bool, float]:
    same, worst = True, 0.0
    for rows_a, rows_b in zip(a["rows"], b["rows"], strict=True):
        same = same and rows_a["pred"].tolist() == rows_b["pred"].tolist()
        for x, y in zip(rows_a["choice_ll"], rows_b["choice_ll"], strict=True):
            worst = max([worst, *(abs(p - q) for p, q in zip(x, y, strict=True))])
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--tasks", nargs="+", default=["piqa", "hellaswag"])
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--task-limit", nargs="*", default=[], metavar="TASK=N",
                        help="a task's own limit, e.g. mmlu=3 (per subject)")  # fmt: skip
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["reverse_prune", "mka"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1,
                        help="evaluations at once, in forked workers (CPU time is per worker)")  # fmt: skip
    parser.add_argument("--profile", default=None, help="cProfile stats file of one variant")
    args = parser.parse_args()
    set_threads(args.threads)

    from mka_exp.layers import num_layers

    loaded = load(args.model)
    grid = variants(loaded, args.methods, args.num_layers)
    depths, fp_seconds = shared_depths(grid)
    needed = sorted({k for name, k in depths.items() if name != "dense" and k > 0})
    print(f"fingerprints of the dense model ({num_layers(grid['dense'])} layers): "
          f"{fp_seconds:.2f} CPU s; shared depths {depths}; stored layers {needed}")  # fmt: skip
    warm = argparse.Namespace(
        **{**vars(args), "limit": 1, "task_limit": []}
    )  # lm-eval's task index, untimed
    evaluate(grid["dense"], loaded.tokenizer, warm)
    with tempfile.TemporaryDirectory() as tmp:
        on = dict(reuse=tmp, reuse_layers=needed or [1], reuse_bytes=16 * 1024**3)
        plain, reused = run_grid(grid, loaded.tokenizer, args, on)
        report(grid, depths, plain, reused)
        if args.profile and len(grid) > 1:
            name = next(name for name in grid if name != "dense")
            profile(grid[name], loaded.tokenizer, args, on, name)


_SHARED: dict = {}  # the grid and tokenizer, inherited by forked workers (never pickled)


def one(name: str, args, on: dict) -> tuple[str, bool, dict]:
    """One evaluation of `name` (with reuse when `on` is given); with reuse, the store's bytes
    when it ends."""
    result = evaluate(_SHARED["grid"][name], _SHARED["tokenizer"], args, **on)
    if on:
        result["stored"] = store_bytes(Path(on["reuse"]))
    return name, bool(on), result


def run_grid(grid: dict, tokenizer, args, on: dict) -> tuple[dict, dict]:
    """Every model plain and with reuse; the variants' reuse runs wait for the reference's, which
    fills the store. `--jobs 1`: in this process, all plain runs first. More: forked workers take
    the runs in turn, plain and reuse side by side, so both meet the same contention; each worker
    has one thread and its CPU time is its own."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    _SHARED.update(grid=grid, tokenizer=tokenizer)
    first = [(name, {}) for name in grid] + [("dense", on)]
    later = [(name, on) for name in grid if name != "dense"]
    done: dict = {False: {}, True: {}}
    if args.jobs == 1:
        for name, kw in first + later:
            _, reuse, done[reuse][name] = one(name, args, kw)
        return done[False], done[True]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
        pending = {pool.submit(one, name, args, kw) for name, kw in first[-1:] + first[:-1]}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                name, reuse, done[reuse][name] = future.result()
                if reuse and name == "dense":  # the store is full: the variants may start
                    pending |= {pool.submit(one, n, args, kw) for n, kw in later}
    return done[False], done[True]


def profile(model, tokenizer, args, on: dict, name: str) -> None:
    """One more reuse evaluation of `name` under cProfile (the store is full by now)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = evaluate(model, tokenizer, args, **on)
    profiler.disable()
    profiler.dump_stats(args.profile)
    print(f"\nprofile of {name} with reuse ({result['cpu']:.1f} CPU s under cProfile), "
          f"stats in {args.profile}")  # fmt: skip
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler).sort_stats(order).print_stats(30)


def weights(model) -> tuple[float, int]:
    """Multiply-adds per token of a decoder layer's linear maps (their mean over the layers) and
    of the output embedding: the cost model of the bound with the LM head."""
    from torch import nn

    from mka_exp.layers import decoder_layers

    layers = decoder_layers(model)
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules()
                 if isinstance(m, nn.Linear))  # fmt: skip
    return linear / len(layers), model.get_output_embeddings().weight.numel()


def report(grid, depths, plain, reused) -> None:
    """The table; "bound + head" adds the LM head on the scored positions (no reuse skips it:
    its input is the variant's own last hidden state) to both sides of the bound."""
    from mka_exp.layers import num_layers

    print("| model | layers | start k | bound (new work) | bound + head | CPU s plain | "
          "CPU s reuse | ratio | tokens x layers plain | reuse | scored positions | "
          "store bytes after | preds identical | max |dlogp| |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0, 0, 0.0, 0.0]
    for name, model in grid.items():
        n, (layer_w, head_w) = num_layers(model), weights(model)
        p, r = plain[name], reused[name]
        full = p["stats"]["run_tokens"] * n
        done, scored = r["stats"]["layer_tokens"], r["stats"]["scored_positions"]
        same, worst = compare(p, r)
        bound = (n - depths[name]) / n if name != "dense" else 1.0
        macs = (done * layer_w + scored * head_w, full * layer_w + scored * head_w)
        totals = [totals[0] + p["cpu"], totals[1] + r["cpu"], totals[2] + full, totals[3] + done,
                  totals[4] + macs[0], totals[5] + macs[1]]  # fmt: skip
        print(f"| {name} | {n} | {r['start']} | {bound:.3f} | "
              f"{macs[0] / macs[1]:.3f} | {p['cpu']:.1f} | {r['cpu']:.1f} | "
              f"{p['cpu'] / r['cpu']:.2f}x | {full:,} | {done:,} | {scored:,} | "
              f"{r['stored']:,} | {same} | {worst:.2e} |")  # fmt: skip
    print(f"| grid | | | {totals[3] / totals[2]:.3f} | {totals[4] / totals[5]:.3f} | "
          f"{totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.2f}x | {totals[2]:,} | "
          f"{totals[3]:,} | | | | |")  # fmt: skip


if __name__ == "__main__":
    main()
