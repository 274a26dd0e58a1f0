"""Benchmark: MKA analysis time and evaluation throughput at Llama-3-8B shape on a GPU.

    python benchmarks/gpu_analysis.py [--prompts 57] [--seq-len 512] [--max-points 1024]
                                      [--eval-batch 16] [--eval-seq 512] [--eval-batches 8]
                                      [--lm-eval-limit 50]
    python benchmarks/gpu_analysis.py --device cpu --small      # smoke check without a GPU

The model is config-built with random weights (`mka_exp.models.build_random_model`): 32 layers,
hidden 4096, MLP 14336, 32 heads, 8 KV heads, bfloat16 (Llama-3-8B's shape; the vocabulary is
the in-process toy tokenizer's, so the LM head is tiny). `--small` uses a 4-layer, hidden-64
shape. Random weights do not change the cost of any step timed here.

Timed, with `torch.cuda.synchronize()` around each step and the peak GPU memory of each:
1. capture: `capture_hidden_states` on `--prompts` random-token prompts of up to `--seq-len`
   tokens (lengths drawn in [seq_len/2, seq_len], right-padded), `--max-points` sampled tokens;
2. similarity: `mka_exp.manifold.layer_similarity` on the captured [L, n, D] outputs, moved to
   the device (the copy is timed with it);
3. raw forward throughput: `--eval-batches` batches of `--eval-batch` x `--eval-seq` random
   tokens through `model(ids).logits` (as lm-eval's HFLM calls it), tokens/s;
4. lm-eval throughput (`--lm-eval-limit` > 0): `mka_exp.evaluation.evaluate` on piqa, scored
   tokens/s counted as in eval_throughput.py.

Without CUDA (and without `--device cpu`) it stops with a message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> str:
    """Peak GPU memory since the last reset, formatted; "-" off the GPU."""
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.startswith("cuda") else "-"


def timed(device: str, fn):
    """(result, seconds, peak GB) of fn() with the device synchronised around it."""
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start, peak_gb(device)


def random_calibration(vocab: int, prompts: int, seq_len: int, batch_size: int, seed: int = 0):
    from mka_exp.calibration import CalibrationSet

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (prompts, seq_len), generator=gen)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (prompts,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return CalibrationSet("random_tokens", [""] * prompts, ids * mask, mask, batch_size)


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


def lm_eval_throughput(model, tokenizer, limit: int, batch_size: int, device: str):
    from eval_throughput import Recorder, instrument

    from mka_exp.evaluation import evaluate, known_tasks

    data_root = str(ROOT.parent / "shared" / "benchmarks")
    known_tasks()
    evaluate(model, tokenizer, ["piqa"], 2, batch_size, data_root=data_root)  # warm-up
    recorder = Recorder(model)
    try:
        with instrument(recorder):
            _, seconds, peak = timed(
                device,
                lambda: evaluate(
                    model, tokenizer, ["piqa"], limit, batch_size, data_root=data_root
                ),
            )
    finally:
        recorder.remove()
    return recorder.scored_tokens / seconds, seconds, recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--small", action="store_true", help="tiny shape (smoke check)")
    parser.add_argument("--prompts", type=int, default=57)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="capture batch size")
    parser.add_argument("--max-points", type=int, default=1024)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--eval-seq", type=int, default=512)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--lm-eval-limit", type=int, default=50, help="0: skip lm-eval")
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: default)")
    args = parser.parse_args()
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
    from mka_exp.activations import capture_hidden_states
    from mka_exp.manifold import layer_similarity
    from mka_exp.models import build_random_model

    device, shape = args.device, SHAPE_SMALL if args.small else SHAPE_8B
    lm, build_s, _ = timed(
        device, lambda: build_random_model(device=device, dtype=args.dtype, **shape)
    )
    model, vocab = lm.model, len(lm.tokenizer)
    params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(
        f"device {device} ({gpu}), dtype {next(model.parameters()).dtype}, shape {shape}, "
        f"{params / 1e9:.2f} B parameters; built in {build_s:.1f} s"
    )

    calib = random_calibration(vocab, args.prompts, args.seq_len, args.batch_size)
    states, capture_s, capture_gb = timed(
        device,
        lambda: capture_hidden_states(
            model, calib, "tokens", max_points=args.max_points, batch_size=args.batch_size
        ),
    )
    sim, sim_s, sim_gb = timed(device, lambda: layer_similarity(states[1:].to(device)))
    assert sim.shape == (shape["num_layers"],) * 2 and bool(torch.isfinite(sim).all())
    states = None  # free the host copy before the throughput runs

    tps, raw_s, raw_gb = raw_throughput(
        model, vocab, args.eval_batch, args.eval_seq, args.eval_batches, device
    )
    tokens = int(calib.attention_mask.sum())
    print(f"{'step':<44}{'seconds':>9}{'peak GB':>9}")
    print(
        f"{f'capture ({args.prompts} prompts, {tokens} tokens, n={args.max_points})':<44}"
        f"{capture_s:>9.2f}{capture_gb:>9}"
    )
    print(f"{'layer_similarity [L, L] on the device':<44}{sim_s:>9.2f}{sim_gb:>9}")
    print(f"{'MKA analysis total (capture + similarity)':<44}{capture_s + sim_s:>9.2f}")
    print(
        f"{f'raw forward {args.eval_batches} x [{args.eval_batch}, {args.eval_seq}]':<44}"
        f"{raw_s:>9.2f}{raw_gb:>9}   {tps:,.0f} tokens/s"
    )
    if args.lm_eval_limit > 0:
        eval_tps, eval_s, rec = lm_eval_throughput(
            model, lm.tokenizer, args.lm_eval_limit, args.eval_batch, device
        )
        print(
            f"{f'lm-eval piqa, limit {args.lm_eval_limit}':<44}{eval_s:>9.2f}{'':>9}"
            f"   {eval_tps:,.0f} scored tokens/s ({rec.scored_tokens} tokens, "
            f"{len(rec.batches)} batches, {rec.forward_s:.2f} s in forward, "
            f"{rec.build_s:.2f} s building tasks)"
        )


if __name__ == "__main__":
    main()
