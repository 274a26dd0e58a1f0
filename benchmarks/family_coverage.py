"""Does every method, repair and CPU quantizer work on a model family, and does its saved model
reload with the logits that were scored? One row per point.

Not a speed benchmark: the proof issue 13 asks for once per new family ("every layer method, the
quantizers and save -> reload must work on them"), run through `pipeline.run` with the real
configs at small sizes (2 layers, short calibration prompts, piqa 10) so that it fits minutes, not
the evidence's hours. For each point it saves the compressed model (`save=true`), reloads it with
`AutoModelForCausalLM.from_pretrained` and compares the reloaded model's logits with the
in-memory model the pipeline then scores, on a fixed text: the largest absolute difference.

    python benchmarks/family_coverage.py --model qwen25_coder_05b --out /tmp/coverage.md
    python benchmarks/family_coverage.py --model tiny_llama --only rtn   # seconds

bnb_int8 / bnb_nf4 need CUDA and are not run here (the `gpu` tests and gpu_check.py cover them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mka_exp import pipeline  # noqa: E402
from mka_exp.models import saving  # noqa: E402

ALG1 = "method=mka method.pairing=most_similar method.lam=paper method.scope=all"
CUT = "method.ratio=null method.num_layers=2"
POINTS = [  # (label, overrides)
    ("reverse_prune", f"method=reverse_prune {CUT}"),
    ("reverse_prune keep_final", f"method=reverse_prune method.keep_final=true {CUT}"),
    ("shortgpt", f"method=shortgpt {CUT}"),
    ("angular", f"method=angular {CUT}"),
    ("sleb", "method=sleb method.ratio=null method.num_layers=1"),  # L forward passes a removal
    ("mka defaults", f"method=mka {CUT}"),
    ("mka Algorithm 1", f"{ALG1} {CUT}"),
    ("laco m=1", f"method=laco method.m=1 {CUT}"),
    ("sparsegpt 50 %", "method=sparsegpt"),
    ("angular + repair=linear", f"method=angular {CUT} repair=linear"),
    ("mka + repair=linear", f"method=mka {CUT} repair=linear"),
    ("reverse_prune + rtn", f"method=reverse_prune {CUT} quant=rtn"),
    ("reverse_prune + gptq", f"method=reverse_prune {CUT} quant=gptq"),
    ("reverse_prune + awq", f"method=reverse_prune {CUT} quant=awq"),
    ("reverse_prune + smoothquant", f"method=reverse_prune {CUT} quant=smoothquant"),
    ("mka + gptq", f"method=mka {CUT} quant=gptq"),
]
TEXT = "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level."
HEADER = (
    "| point | layers | quantizer | bits | piqa acc (10) | reload max abs logit diff "
    "| seconds | outcome |\n|---|---|---|---|---|---|---|---|"
)


def compose_point(overrides: list[str], model: str, root: Path, data_root: str) -> object:
    base = [
        f"model={model}",
        "logger=none",
        f"data_root={data_root}",
        f"paths.output_root={root}",
        f"paths.output_dir={root / 'run'}",
        f"paths.records_dir={root}",
        "calib.max_length=24",
        "eval.tasks=[piqa]",
        "eval.limit=10",
        "save=true",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=base + overrides)


def logits(model, tokenizer) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    ids = tokenizer(TEXT, return_tensors="pt").to(device)
    with torch.no_grad():
        return model(**ids).logits.float().cpu()


def checking_reload(original, diffs: list[float]):
    """`save_compressed` that, after saving, reloads the directory and records how far the
    reloaded model's logits are from the in-memory model's (the one the pipeline scores next)."""

    def save_and_check(model, tokenizer, path):
        size = original(model, tokenizer, path)
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        diffs.append(float((logits(model, tokenizer) - logits(reloaded, tokenizer)).abs().max()))
        return size

    return save_and_check


def run_point(overrides: str, model: str, data_root: str) -> dict:
    diffs: list[float] = []
    original = saving.save_compressed
    saving.save_compressed = checking_reload(original, diffs)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_point(overrides.split(), model, Path(tmp), data_root)
            record = pipeline.run(cfg)
    finally:
        saving.save_compressed = original
    record["seconds"] = time.perf_counter() - start
    record["reload_diff"] = diffs[0] if diffs else None
    return record


def row(label: str, overrides: str, model: str, data_root: str) -> str:
    try:
        rec = run_point(overrides, model, data_root)
    except Exception as err:  # one failing point is a row, the rest still run
        traceback.print_exc()
        line = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        return f"| {label} | | | | | | | failed: {line} |"
    diff = rec["reload_diff"]
    ok = diff is not None and diff <= 1e-3
    cells = [
        label,
        f"{rec['layers_before']} -> {rec['layers_after']}",
        rec["quantizer"],
        rec["weight_bits"],
        f"{rec['metrics']['piqa/acc']:.2f}",
        "not saved" if diff is None else f"{diff:.2e}",
        f"{rec['seconds']:.0f}",
        "ok" if ok else "reload differs",
    ]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen25_coder_05b", help="a conf/model name")
    parser.add_argument("--only", nargs="*", help="keep the points whose label has one of these")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_root = os.environ.get("MKA_EXP_DATA_ROOT", str(REPO.parent / "shared" / "benchmarks"))
    points = [p for p in POINTS if not args.only or any(o in p[0] for o in args.only)]
    rows = [HEADER]
    for label, overrides in points:
        rows.append(row(label, overrides, args.model, data_root))
        print(rows[-1], flush=True)
    table = f"model={args.model}\n\n" + "\n".join(rows) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    print(table)
    return 0 if all("| ok |" in r for r in rows[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
