"""Benchmark: SLEB's scoring of one removal step, bottom-up walk vs one full pass per candidate.

    python benchmarks/sleb_search.py [--random-model] [--prompts 16] [--max-length 128]
                                     [--batch-size 8] [--repeats 1] [--threads 1]

One SLEB removal step scores every layer p by the calibration perplexity of the model without p.

- ``full_pass``: the naive way, and this project's until 2026-12-03: for each candidate p, stand
  an identity in for p and run the whole model over the calibration set (L passes of L - 1
  layers each, plus the LM head).
- ``walk``: ours, `mka_exp.methods.sleb.removal_perplexities`: the layers below a candidate are
  the same for every candidate, so the walk keeps the hidden states entering p, scores p by
  running only the layers above it, then runs layer p once to move on (L(L-1)/2 + L - 1 layer
  forwards, the LM head unchanged).

Both must give the same perplexities; the script prints the largest relative difference. Counted
with hooks: decoder-layer forwards. Timed: wall and process CPU seconds of the scoring only
(model load and calibration excluded; the minimum over `--repeats`). The LM head's share is the
same in both, so the ratio is below the ratio of layer forwards; it is largest on a big vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from activation_capture import calibration, load_model, set_threads  # noqa: E402

from mka_exp.layers import decoder_layers, num_layers, swapped_layers  # noqa: E402
from mka_exp.methods.sleb import calibration_nll, removal_perplexities  # noqa: E402


def full_pass(model, calib, batch_size) -> list[float]:
    """Every candidate scored by a whole forward pass with an identity in its place."""
    scores = []
    for position in range(num_layers(model)):
        with swapped_layers(model, {position: None}):
            scores.append(math.exp(calibration_nll(model, calib, batch_size)))
    return scores


VARIANTS = {"full_pass": full_pass, "walk": removal_perplexities}


def count_layer_forwards(model) -> tuple[dict, list]:
    counter = {"layers": 0}

    def hook(*_):
        counter["layers"] += 1

    return counter, [layer.register_forward_hook(hook) for layer in decoder_layers(model)]


def measure(name: str, score, model, repeats: int) -> dict:
    """`score()` timed (wall and CPU, the fastest of `repeats`) with its decoder-layer forwards."""
    best = None
    for _ in range(repeats):
        counter, handles = count_layer_forwards(model)
        wall, cpu = time.perf_counter(), time.process_time()
        scores = score()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        for handle in handles:
            handle.remove()
        if best is None or wall < best["wall"]:
            best = {"variant": name, "wall": wall, "cpu": cpu, "scores": scores, **counter}
    return best


def print_rows(rows: list[dict]) -> None:
    """The variants' table, each against the first (the baseline)."""
    print("| variant | layer forwards | wall s | CPU s | speed-up over full_pass (wall) |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = rows[0]["wall"] / row["wall"]
        print(
            f"| {row['variant']} | {row['layers']} | {row['wall']:.1f} | {row['cpu']:.1f} "
            f"| {ratio:.2f} |"
        )


def search_setup(parser: argparse.ArgumentParser) -> tuple:
    """The options a search benchmark shares, parsed; the model and its calibration set loaded."""
    parser.add_argument("--random-model", action="store_true", help="a small random Llama")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    lm = load_model(args.random_model)
    calib = calibration(lm.tokenizer, args.prompts, args.max_length, args.batch_size)
    tokens = int(calib.attention_mask.sum())
    print(f"{num_layers(lm.model)} layers, {len(calib)} prompts, {tokens} tokens")
    return args, lm, calib


def main() -> None:
    args, lm, calib = search_setup(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    with torch.no_grad():
        rows = [
            measure(name, lambda f=f: f(lm.model, calib, args.batch_size), lm.model, args.repeats)
            for name, f in VARIANTS.items()
        ]
    base, ours = rows
    diff = max(abs(a - b) / b for a, b in zip(ours["scores"], base["scores"], strict=True))
    print_rows(rows)
    print(f"largest relative difference of the {len(base['scores'])} perplexities: {diff:.2e}")
    if diff > 1e-5:
        sys.exit("the walk's perplexities differ from the full passes'")


if __name__ == "__main__":
    main()
