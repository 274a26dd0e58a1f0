"""Benchmark (`repair.reuse`): the linear repair of a grid of cuts on the same calibration tokens,
fitted without and with the store of dense states, in one process.

    OMP_NUM_THREADS=1 python benchmarks/repair_dense_states.py [--model smollm2_135m]
        [--tokens 20000] [--cuts 4 7] [--reuse-layers 4] [--threads 1]

Each cut is `reverse_prune` removing that many top layers (one fit: the last kept layer stands
for the removed span) with `repair=linear` defaults but every token (`max_tokens=null`) on
`calib=hellaswag_passages` (`--tokens` fit tokens, 10 % as many held out). Without a store each
fit runs the dense model over every token up to the top; with one, the first cut's pass keeps
every `--reuse-layers`-th boundary and the later cuts read theirs (or start from the highest
stored boundary below their cut). Printed per cut: CPU seconds of the repair both ways and their
ratio, the dense layer x tokens each ran, entries read, the store's bytes, and the largest
difference between the folded `down_proj` weights of the two ways (0: the same maps).
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

from activation_capture import DATA_ROOT, set_threads  # noqa: E402
from eval_reuse import load  # noqa: E402


def repair_once(loaded, calib, cut: int, **reuse) -> dict:
    from mka_exp.layers import decoder_layers
    from mka_exp.methods.reverse_prune import ReversePrune
    from mka_exp.repair.linear import LinearRepair

    model = copy.deepcopy(loaded.model)
    repair = LinearRepair(max_tokens=None, **reuse)
    dense = repair.prepare(model, calib)
    stats = ReversePrune(num_layers=cut).compress(model, calib)
    start = time.process_time()
    result = repair.repair(model, calib, stats, dense)
    seconds = time.process_time() - start
    weights = [layer.mlp.down_proj.weight.detach().clone() for layer in decoder_layers(model)]
    return {"cpu": seconds, "stats": result, "weights": weights}


def store_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.glob("*/*.bin"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--cuts", type=int, nargs="+", default=[4, 7])
    parser.add_argument("--reuse-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)

    from mka_exp.calibration import hellaswag_passages

    loaded = load(args.model)
    calib = hellaswag_passages(loaded.tokenizer, start_row=1000, num_tokens=args.tokens,
                               heldout_tokens=args.tokens // 10, max_length=256, batch_size=16,
                               data_root=DATA_ROOT)  # fmt: skip
    plain = {cut: repair_once(loaded, calib, cut) for cut in args.cuts}
    with tempfile.TemporaryDirectory() as tmp:
        on = {"reuse": tmp, "reuse_layers": args.reuse_layers}
        reused, stored = {}, {}
        for cut in args.cuts:
            reused[cut] = repair_once(loaded, calib, cut, **on)
            stored[cut] = store_bytes(Path(tmp))
    report(args, plain, reused, stored)


def report(args, plain: dict, reused: dict, stored: dict) -> None:
    print(f"{args.model}, {args.tokens:,} fit tokens (+{args.tokens // 10:,} held out), "
          f"boundaries kept every {args.reuse_layers}")  # fmt: skip
    print("| cut (layers removed) | CPU s plain | CPU s store | ratio | dense layer x tokens plain "
          "| store | entries read | store bytes after | max abs d weight |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    total = [0.0, 0.0]
    for cut in args.cuts:
        p, r = plain[cut], reused[cut]
        worst = max(
            float((a - b).abs().max()) for a, b in zip(p["weights"], r["weights"], strict=True)
        )
        total = [total[0] + p["cpu"], total[1] + r["cpu"]]
        print(f"| {cut} | {p['cpu']:.1f} | {r['cpu']:.1f} | {p['cpu'] / r['cpu']:.2f}x | "
              f"{p['stats']['dense_layer_tokens']:,} | {r['stats']['dense_layer_tokens']:,} | "
              f"{r['stats']['dense_entries_read']:,} | {stored[cut]:,} | {worst:.1e} |")  # fmt: skip
    print(f"| all | {total[0]:.1f} | {total[1]:.1f} | {total[0] / total[1]:.2f}x | | | | | |")


if __name__ == "__main__":
    main()
