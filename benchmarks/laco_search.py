"""Benchmark: LaCo's scoring of every candidate merge of one model state, from kept layer inputs
vs one full pass per candidate.

    python benchmarks/laco_search.py [--random-model] [--m 3] [--prompts 16] [--max-length 128]
                                     [--batch-size 8] [--repeats 1] [--threads 1]

LaCo's top-down walk scores each candidate l (layers l..l+m merged into l) by the cosine of the
merged model's final hidden states to the dense model's.

- ``full_pass``: this project's way until 2026-12-07: for each candidate, merge and run the
  whole model over the calibration set.
- ``kept``: ours, `mka_exp.methods.laco.final_states_from`: the layers below a candidate are
  those of the model being searched, so one full pass keeps the inputs to every layer and each
  candidate runs only from layer l up.

Both must give the same similarities; the script prints the largest difference. Counted with
hooks: decoder-layer forwards (the one full pass that keeps the inputs included). Timed: wall and
process CPU seconds of the scoring only (the dense model's states excluded; the minimum over
`--repeats`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sleb_search import measure, print_rows, search_setup  # noqa: E402

from mka_exp.layers import decoder_layers, num_layers, swapped_layers  # noqa: E402
from mka_exp.methods.laco import LaCo, final_states, mean_cosine, rdsc_merge  # noqa: E402


def full_pass(model, calib, batch_size, m, dense) -> list[float]:
    """Every candidate merged in and scored by a whole forward pass (the way before 2026-12-07)."""
    layers, scores = decoder_layers(model), []
    for start in range(num_layers(model) - m):
        merged = rdsc_merge(layers[start], [layers[start + i] for i in range(1, m + 1)])
        swap = {start: merged, **dict.fromkeys(range(start + 1, start + m + 1))}
        with swapped_layers(model, swap):
            scores.append(mean_cosine(final_states(model, calib, batch_size)[0], dense))
    return scores


def kept(model, calib, batch_size, m, dense) -> list[float]:
    """LaCo's own scoring (`LaCo.similarity`): one full pass keeps the layer inputs, then each
    candidate runs from its first layer up."""
    method = LaCo(num_layers=1, m=m, batch_size=batch_size)
    return [method.similarity(model, calib, dense, s, m) for s in range(num_layers(model) - m)]


VARIANTS = {"full_pass": full_pass, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=3, help="layers merged into the first")
    args, lm, calib = search_setup(parser)
    print(f"m={args.m}: {num_layers(lm.model) - args.m} candidate merges")
    with torch.no_grad():
        dense, _ = final_states(lm.model, calib, args.batch_size)
        rows = [
            measure(name, lambda f=f: f(lm.model, calib, args.batch_size, args.m, dense),
                    lm.model, args.repeats)
            for name, f in VARIANTS.items()
        ]  # fmt: skip
    base, ours = rows
    diff = max(abs(a - b) for a, b in zip(ours["scores"], base["scores"], strict=True))
    print_rows(rows)
    print(f"largest difference of the {len(base['scores'])} similarities: {diff:.2e}")
    if diff > 1e-5:
        sys.exit("the kept inputs' similarities differ from the full passes'")


if __name__ == "__main__":
    main()
