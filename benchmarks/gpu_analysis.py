"""Benchmark: MKA analysis, layer surgery, generation and evaluation throughput at Llama-3-8B
shape on a GPU.

    python benchmarks/gpu_analysis.py [--steps analysis,surgery,generate,throughput]
                                      [--prompts 57] [--seq-len 512] [--max-points 1024]
                                      [--merges 4] [--prunes 4] [--eval-batch 16]
                                      [--lm-eval-limit 50] [--json FILE] [--data-root DIR]
    python benchmarks/gpu_analysis.py --device cpu --small      # smoke check without a GPU

The model is config-built with random weights (`mka_exp.models.toy.build_random_model`) directly on
the device (inside `torch.device(device)`, so 7 B parameters are never initialised on the host):
32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads, bfloat16 (Llama-3-8B's shape; the
vocabulary is the in-process toy tokenizer's, so the LM head is tiny). `--small` uses a
4-layer, hidden-64 shape. Random weights do not change the cost of any step timed here.

Steps (`--steps`), timed with `torch.cuda.synchronize()` around each, with the peak GPU memory
of each; throughput runs first (on the dense model), then analysis, surgery, generate:
1. analysis: `capture_hidden_states` on `--prompts` random-token prompts of up to `--seq-len`
   tokens (lengths in [seq_len/2, seq_len], right-padded), `--max-points` sampled tokens; then
   `mka_exp.manifold.layer_similarity` (NPIB) on the captured [L, n, D] outputs moved to the
   device. Their sum is the MKA analysis time (goal on an H200: < 2 minutes).
2. surgery (needs 1): `--merges` MKA merges on the device (`MKA.merge_step`: the method's own
   pairing and lam rule on the similarity of step 1), then `--prunes` last layers removed
   (`remove_layers`, as reverse_prune). Checked: the first merge wrote
   lam * a + (1 - lam) * b (computed in float32, rounded once) into the kept layer; every
   parameter is still on the device in the model's dtype; the config has the new layer count.
3. generate: greedy `generate()` with and without the KV cache on the (compressed) model.
   The tokens must agree; where they diverge, the gap between the two candidate tokens' logits
   in an uncached forward says whether it is a rounding tie (<= `--tie-tol`) or a real bug.
4. throughput (`--lm-eval-limit` > 0 for the lm-eval part), on the dense model: raw forward tokens/s on random [eval-batch, eval-seq] batches; then lm-eval
   piqa with plain HFLM while every batch it feeds the model is recorded, the same batches
   replayed through `model(ids).logits` (the share of raw throughput lm-eval reaches, scored
   tokens counted as in eval_throughput.py), and the default shared-context evaluation.

`--json FILE` writes every figure (rewritten after each step, so a killed run keeps what it
measured). Without CUDA (and without `--device cpu`) it stops with a message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = ("analysis", "surgery", "generate", "throughput")
SHAPE_8B = {
    "num_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_heads": 32,
    "num_kv_heads": 8,
}
SHAPE_SMALL = {
    "num_layers": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "num_kv_heads": 2,
}
# --small shrinks the workload too (only where the user left the 8B-shape default)
SMALL_DEFAULTS = {
    "prompts": 8,
    "seq_len": 64,
    "max_points": 128,
    "merges": 1,
    "prunes": 1,
    "eval_batch": 4,
    "eval_seq": 64,
    "eval_batches": 2,
    "lm_eval_limit": 8,
    "new_tokens": 8,
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    """Peak GPU memory (GiB) since the last reset; None off the GPU."""
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def timed(device: str, fn):
    """(result, seconds, peak GiB) of fn() with the device synchronised around it."""
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start, peak_gb(device)


def fmt_gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_json(path: str | None, data: dict) -> None:
    """Rewrite the figures file (temp + rename: never half-written)."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def default_data_root() -> str:
    """The offline mirror beside the repo, else the rows carried for the device check."""
    beside = ROOT.parent / "shared" / "benchmarks"
    return str(beside if beside.is_dir() else ROOT / ".gpu_wheels" / "data")


def random_calibration(vocab: int, prompts: int, seq_len: int, batch_size: int, seed: int = 0):
    from mka_exp.calibration import CalibrationSet

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (prompts, seq_len), generator=gen)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (prompts,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return CalibrationSet("random_tokens", [""] * prompts, ids * mask, mask, batch_size)


def build(args):
    """The random model, initialised on the device itself; (LoadedModel, figures)."""
    from mka_exp.models.toy import build_random_model

    device = args.device
    shape = SHAPE_SMALL if args.small else SHAPE_8B

    def make():
        with torch.device(device):
            return build_random_model(device=device, dtype=args.dtype, **shape)

    lm, seconds, _ = timed(device, make)
    params = sum(p.numel() for p in lm.model.parameters())
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    figures = {
        "device": device,
        "device_name": gpu,
        "dtype": str(next(lm.model.parameters()).dtype),
        "shape": shape,
        "parameters": params,
        "build_s": round(seconds, 3),
        "torch": torch.__version__,
    }
    print(
        f"device {device} ({gpu}), dtype {figures['dtype']}, shape {shape}, "
        f"{params / 1e9:.2f} B parameters; built in {seconds:.1f} s"
    )
    return lm, figures


def analysis(lm, args) -> tuple[torch.Tensor, dict]:
    """Capture + NPIB similarity; (similarity [L, L] on the device, figures)."""
    from mka_exp.activations import capture_hidden_states
    from mka_exp.manifold import layer_similarity

    device, model = args.device, lm.model
    calib = random_calibration(len(lm.tokenizer), args.prompts, args.seq_len, args.batch_size)
    states, capture_s, capture_gb = timed(
        device,
        lambda: capture_hidden_states(
            model, calib, "tokens", max_points=args.max_points, batch_size=args.batch_size
        ),
    )
    points = int(states.shape[1])
    sim, sim_s, sim_gb = timed(device, lambda: layer_similarity(states[1:].to(device)))
    layers = model.config.num_hidden_layers
    if sim.shape != (layers, layers) or not bool(torch.isfinite(sim).all()):
        raise AssertionError(f"similarity {tuple(sim.shape)} not a finite [{layers}, {layers}]")
    tokens = int(calib.attention_mask.sum())
    figures = {
        "prompts": args.prompts,
        "tokens": tokens,
        "points": points,
        "capture_s": round(capture_s, 3),
        "capture_peak_gb": capture_gb,
        "similarity_s": round(sim_s, 3),
        "similarity_peak_gb": sim_gb,
        "similarity_device": str(sim.device),
        "analysis_total_s": round(capture_s + sim_s, 3),
        "goal_s": 120,
    }
    print(f"{'step':<48}{'seconds':>9}{'peak GB':>9}")
    label = f"capture ({args.prompts} prompts, {tokens} tokens, n={points})"
    print(f"{label:<48}{capture_s:>9.2f}{fmt_gb(capture_gb):>9}")
    print(f"{'layer_similarity [L, L] on the device':<48}{sim_s:>9.2f}{fmt_gb(sim_gb):>9}")
    print(f"{'MKA analysis total (capture + similarity)':<48}{capture_s + sim_s:>9.2f}")
    return sim, figures


def off_device(model, device: str, dtype: torch.dtype) -> list[str]:
    """Names of floating parameters not on `device` in `dtype` (should be none)."""
    want = torch.device(device)
    return [
        name
        for name, p in model.named_parameters()
        if p.device.type != want.type or (p.is_floating_point() and p.dtype != dtype)
    ]


def surgery(lm, sim: torch.Tensor, args) -> dict:
    """MKA merges then reverse pruning on the device, with the checks of the docstring."""
    from mka_exp.layers import decoder_layers, num_layers, remove_layers
    from mka_exp.methods.base import LayerTracker
    from mka_exp.methods.mka import MKA, choose_pair, drop_layer, merge_ratio

    device, model = args.device, lm.model
    dtype = next(model.parameters()).dtype
    before = num_layers(model)
    method = MKA(num_layers=max(1, args.merges))
    keep, drop = choose_pair(sim, method.pairing)
    lam = merge_ratio(sim, keep, drop, method.lam)
    layers = decoder_layers(model)
    a = layers[keep].mlp.down_proj.weight.detach().clone()
    b = layers[drop].mlp.down_proj.weight.detach().clone()
    expected = (lam * a.float() + (1 - lam) * b.float()).to(dtype)
    del a, b
    tracker, merges = LayerTracker(before), []

    def merge_all():
        current = sim
        for _ in range(args.merges):
            merges.append(method.merge_step(model, current, tracker))
            current = drop_layer(current, merges[-1]["drop_position"])
            if len(merges) == 1:  # the kept layer stays at `keep` (keep < drop)
                got = decoder_layers(model)[keep].mlp.down_proj.weight
                if not torch.equal(got, expected):
                    diff = float((got.float() - expected.float()).abs().max())
                    raise AssertionError(f"first merge: weight differs from the blend by {diff}")

    _, merge_s, merge_gb = timed(device, merge_all)
    after_merge = num_layers(model)
    prune = list(range(after_merge - args.prunes, after_merge))
    _, prune_s, _ = timed(device, lambda: remove_layers(model, prune))
    after = num_layers(model)
    stray = off_device(model, device, dtype)
    if stray or after != before - args.merges - args.prunes:
        raise AssertionError(f"after surgery: {after} layers, off device/dtype: {stray[:5]}")
    if model.config.num_hidden_layers != after:
        raise AssertionError(f"config says {model.config.num_hidden_layers} layers, model {after}")
    figures = {
        "layers_before": before,
        "merges": [{k: v for k, v in m.items() if k != "drop_position"} for m in merges],
        "first_merge_exact": True,
        "merge_s": round(merge_s, 3),
        "merge_peak_gb": merge_gb,
        "pruned_positions": prune,
        "prune_s": round(prune_s, 4),
        "layers_after": after,
        "params_on_device": True,
    }
    print(f"{f'{args.merges} MKA merges on the device':<48}{merge_s:>9.2f}{fmt_gb(merge_gb):>9}")
    print(f"{f'{args.prunes} layers pruned ({before} -> {after} layers)':<48}{prune_s:>9.3f}")
    return figures


def generate_agree(lm, args) -> dict:
    """Greedy generation with and without the KV cache; where it differs, is it a tie?"""
    device, model = args.device, lm.model
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, len(lm.tokenizer), (args.gen_batch, args.gen_prompt), generator=gen)
    ids = ids.to(device)
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": lm.tokenizer.pad_token_id,
    }
    with torch.no_grad():
        cached, cached_s, gen_gb = timed(
            device, lambda: model.generate(ids, use_cache=True, **kwargs)
        )
        plain, plain_s, _ = timed(device, lambda: model.generate(ids, use_cache=False, **kwargs))
    figures = {
        "batch": args.gen_batch,
        "prompt_tokens": args.gen_prompt,
        "new_tokens": args.new_tokens,
        "cached_s": round(cached_s, 3),
        "uncached_s": round(plain_s, 3),
        "peak_gb": gen_gb,
        "exact_agree": bool(torch.equal(cached, plain)),
        "tie_tol": args.tie_tol,
    }
    if figures["exact_agree"]:
        figures["agree"] = True
    else:  # first differing position; the logit gap there in an uncached forward of the prefix
        row, col = (cached != plain).nonzero()[0].tolist()
        with torch.no_grad():
            logits = model(cached[row : row + 1, :col], use_cache=False).logits[0, -1].float()
        gap = float((logits[cached[row, col]] - logits[plain[row, col]]).abs())
        figures.update(
            first_divergence={"row": row, "new_token": col - ids.shape[1], "logit_gap": gap},
            agree=gap <= args.tie_tol,
        )
    print(
        f"{'generate, KV cache':<48}{cached_s:>9.2f}{fmt_gb(gen_gb):>9}\n"
        f"{'generate, no cache':<48}{plain_s:>9.2f}\n"
        f"cached and uncached tokens: exact {figures['exact_agree']}, agree {figures['agree']}"
    )
    return figures


def raw_throughput(model, vocab: int, batch: int, seq: int, batches: int, device: str):
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(batches + 1)]
    data = [d.to(device) for d in data]
    with torch.no_grad():
        model(data[0]).logits  # noqa: B018  (warm-up)

        def run():
            for ids in data[1:]:
                model(ids).logits  # noqa: B018

        _, seconds, peak = timed(device, run)
    return batch * seq * batches / seconds, seconds, peak


def replay(model, batches: list[torch.Tensor], device: str) -> float:
    """Seconds to run lm-eval's recorded batches through model(ids).logits, as HFLM does."""

    def run():
        with torch.no_grad():
            for ids in batches:
                model(ids).logits  # noqa: B018

    return timed(device, run)[1]


def throughput(lm, args) -> dict:
    """Raw forward tokens/s, and lm-eval's tokens/s as a share of raw over the same batches."""
    device, model, tokenizer = args.device, lm.model, lm.tokenizer
    tps, raw_s, raw_gb = raw_throughput(
        model, len(tokenizer), args.eval_batch, args.eval_seq, args.eval_batches, device
    )
    figures = {
        "raw_random": {
            "batches": args.eval_batches,
            "batch": args.eval_batch,
            "seq": args.eval_seq,
            "seconds": round(raw_s, 3),
            "tokens_per_s": round(tps, 1),
            "peak_gb": raw_gb,
        }
    }
    label = f"raw forward {args.eval_batches} x [{args.eval_batch}, {args.eval_seq}]"
    print(f"{label:<48}{raw_s:>9.2f}{fmt_gb(raw_gb):>9}   {tps:,.0f} tokens/s")
    if args.lm_eval_limit <= 0:
        return figures
    from eval_throughput import Recorder, instrument

    from mka_exp.evaluation.harness import known_tasks
    from mka_exp.evaluation.hf import evaluate

    def run_eval(limit: int, share_prefix: bool):
        return evaluate(
            model,
            tokenizer,
            ["piqa"],
            limit=limit,
            batch_size=args.eval_batch,
            data_root=args.data_root,
            share_prefix=share_prefix,
        )

    known_tasks()
    run_eval(2, False)  # warm-up: builds the task, which the timed calls reuse
    recorder = Recorder(model)
    try:
        with instrument(recorder):
            metrics, eval_s, _ = timed(device, lambda: run_eval(args.lm_eval_limit, False))
    finally:
        recorder.remove()
    replay_s = replay(model, recorder.batches, device)
    shared, shared_s, _ = timed(device, lambda: run_eval(args.lm_eval_limit, True))
    scored = recorder.scored_tokens
    figures["lm_eval"] = {
        "task": "piqa",
        "limit": args.lm_eval_limit,
        "batch_size": args.eval_batch,
        "batches": len(recorder.batches),
        "scored_tokens": scored,
        "padded_tokens": sum(int(b.numel()) for b in recorder.batches),
        "hflm_s": round(eval_s, 5),
        "hflm_tokens_per_s": round(scored / eval_s, 1),
        "forward_s": round(recorder.forward_s, 3),
        "build_tasks_s": round(recorder.build_s, 3),
        "raw_same_batches_s": round(replay_s, 5),
        "raw_tokens_per_s": round(scored / replay_s, 1),
        "share_of_raw": round(replay_s / eval_s, 4),
        "shared_prefix_s": round(shared_s, 3),
        "shared_prefix_speedup": round(eval_s / shared_s, 3),
        "metrics_equal": all(abs(shared[k] - metrics[k]) < 1e-6 for k in metrics),
        "acc": metrics.get("piqa/acc"),
    }
    e = figures["lm_eval"]
    print(
        f"{f'lm-eval piqa (HFLM), limit {args.lm_eval_limit}':<48}{eval_s:>9.2f}{'':>9}"
        f"   {e['hflm_tokens_per_s']:,.0f} scored tokens/s ({scored} tokens, "
        f"{e['batches']} batches, {recorder.forward_s:.2f} s in forward)\n"
        f"{'raw forward, the same batches':<48}{replay_s:>9.2f}{'':>9}"
        f"   {e['raw_tokens_per_s']:,.0f} tokens/s: lm-eval reaches {e['share_of_raw']:.0%}\n"
        f"{'lm-eval piqa, shared contexts (default)':<48}{shared_s:>9.2f}"
    )
    return figures


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--small", action="store_true", help="tiny shape and workload (smoke)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    parser.add_argument("--prompts", type=int, default=57)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="capture batch size")
    parser.add_argument("--max-points", type=int, default=1024)
    parser.add_argument("--merges", type=int, default=4)
    parser.add_argument("--prunes", type=int, default=4)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--tie-tol", type=float, default=0.25, help="logit gap read as a tie")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--eval-seq", type=int, default=512)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--lm-eval-limit", type=int, default=50, help="0: skip lm-eval")
    parser.add_argument("--data-root", default=None, help="offline mirror with baber/piqa")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.small:
        for key, value in SMALL_DEFAULTS.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; allowed: {', '.join(STEPS)}")
    if "surgery" in args.steps and "analysis" not in args.steps:
        parser.error("--steps: surgery merges on the similarity of analysis; name both")
    args.data_root = args.data_root or default_data_root()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_analysis.py: CUDA is not available on this machine; this benchmark needs a "
            "GPU (8B-shape model in bfloat16, ~16 GB). For a smoke check of the script on CPU: "
            "python benchmarks/gpu_analysis.py --device cpu --small",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out: dict = {"steps": args.steps, "small": args.small}
    lm, out["build"] = build(args)
    write_json(args.json, out)
    if "throughput" in args.steps:  # on the dense model, before any surgery
        out["throughput"] = throughput(lm, args)
        write_json(args.json, out)
    if "analysis" in args.steps:
        sim, out["analysis"] = analysis(lm, args)
        write_json(args.json, out)
        if "surgery" in args.steps:
            out["surgery"] = surgery(lm, sim, args)
            write_json(args.json, out)
    if "generate" in args.steps:
        out["generate"] = generate_agree(lm, args)
        write_json(args.json, out)
        if not out["generate"]["agree"]:
            sys.exit("gpu_analysis.py: cached and uncached generation disagree beyond a tie")


if __name__ == "__main__":
    main()
