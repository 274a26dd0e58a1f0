"""The GPU check: one prepared command for a lent CUDA machine, every figure as JSON.

    bash benchmarks/gpu_check.sh [--out DIR] [--steps install,pytest,analysis,quantize,throughput]
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/gc   # dry run, no GPU, no wheels

Steps, each a subprocess with its own time limit (killed with its process group when over;
a failed or killed step is recorded and the next one runs), all inside `--budget` seconds:

1. install: the wheels carried in `--wheels` (filled by `benchmarks/fetch_gpu_wheels.sh`) with
   `pip install --no-index --find-links <wheels>/wheels -r <wheels>/requirements.txt` into the
   machine's Python, so pip checks the closure against the image; if that resolution fails,
   `--no-deps --target` into a folder put on PYTHONPATH (and the resolver's complaint is kept).
   Then the versions that matter, whether lm-eval, llm-compressor, bitsandbytes, hydra and
   datasets import, and `pip check`.
2. pytest: `pytest -m gpu` over the test files that hold `gpu` tests; outcome of every test.
3. analysis: `gpu_analysis.py --steps analysis,surgery,generate` at Llama-3-8B shape in bf16:
   capture + NPIB for 32 layers (goal < 2 min), MKA merges and pruning on the GPU, cached vs
   uncached generate.
4. quantize: a small random Llama quantized on the device with GPTQ, AWQ and SmoothQuant
   (llm-compressor, the project's `conf/quant/*.yaml`) and loaded in int8 and nf4
   (bitsandbytes); each, and the dense model, scored by lm-eval on the carried piqa rows, with
   its time, where its parameters ended up and the cosine of its logits to the dense model's.
5. throughput: `gpu_analysis.py --steps throughput` at 8B shape: lm-eval's scored tokens/s as a
   share of the raw forward over the very same batches.

Without CUDA (`--device cpu`, the dry run the slow test tier runs) steps 1, 2 and the
bitsandbytes parts of 4 are recorded as skipped with the reason "no CUDA" (step 1 still reports
versions and imports; step 2 still collects the gpu tests); the rest runs at `--small` sizes.

`<out>/gpu_check.json` is rewritten after every step; `<out>/gpu_check.log` has every step's
output. Exit code 0 when no step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("install", "pytest", "analysis", "quantize", "throughput")
CAPS_S = {"install": 120, "pytest": 150, "analysis": 180, "quantize": 150, "throughput": 120}
MIN_STEP_S = 20  # a step with less time left than this is skipped, not started
QUANTIZERS = ("none", "gptq", "awq", "smoothquant", "bnb_int8", "bnb_nf4")
VERSIONS = (
    "torch",
    "transformers",
    "accelerate",
    "lm_eval",
    "llmcompressor",
    "compressed-tensors",
    "bitsandbytes",
    "datasets",
    "hydra-core",
    "omegaconf",
    "pyarrow",
    "fsspec",
    "huggingface-hub",
    "pydantic",
)
IMPORTS = ("lm_eval.evaluator", "llmcompressor", "bitsandbytes", "hydra", "datasets", "gguf")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


# ----------------------------------------------------------------------------- plumbing


def write_json(path: Path, data: dict) -> None:
    """Rewrite atomically (temp + rename): a killed check never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Check:
    """Runs the steps as time-boxed subprocesses and keeps the JSON and the log up to date."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "gpu_check.json"
        self.log_path = self.out / "gpu_check.log"
        self.log_path.write_text("")
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.start = time.monotonic()
        self.step_deadline = float("inf")  # no subprocess of a step outlives the step's limit
        self.current: subprocess.Popen | None = None
        self.env = {**os.environ, **OFFLINE_ENV}
        self.python_path = [str(ROOT)]
        self.record: dict = {
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": args.device,
            "small": args.small,
            "budget_s": args.budget,
            "steps": {},
            "summary": {},
        }

    @property
    def cuda(self) -> bool:
        return self.args.device.startswith("cuda")

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], limit: float) -> dict:
        """Run `cmd` in its own process group for at most `limit` s; rc, seconds, output tail."""
        limit = min(limit, self.step_deadline - time.monotonic())
        if limit <= 0:
            return {"rc": None, "seconds": 0.0, "timed_out": True, "tail": "not started: no time"}
        env = {**self.env, "PYTHONPATH": os.pathsep.join(self.python_path)}
        if self.env.get("PYTHONPATH"):
            env["PYTHONPATH"] += os.pathsep + self.env["PYTHONPATH"]
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        out_file = self.tmp / f"{name}.out"
        start = time.monotonic()
        with open(out_file, "w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
            self.current = proc
            try:
                rc, timed_out = proc.wait(timeout=limit), False
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = self.kill(proc)
            finally:
                self.current = None
        seconds = time.monotonic() - start
        text = out_file.read_text(errors="replace")
        with open(self.log_path, "a") as log:
            log.write(text + f"\n===== {name}: rc {rc}, {seconds:.1f} s\n")
        return {
            "rc": rc,
            "seconds": round(seconds, 2),
            "timed_out": timed_out,
            "tail": text[-3000:],
        }

    @staticmethod
    def kill(proc: subprocess.Popen) -> int:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                return proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return proc.wait()

    def step(self, name: str, fn) -> None:
        """Run one step within the budget; record status, reason, figures, seconds."""
        limit = min(CAPS_S[name], self.remaining())
        self.step_deadline = time.monotonic() + limit
        print(f"[gpu_check] {name} (limit {limit:.0f} s)", flush=True)
        if name not in self.args.steps:
            result = {"status": "skipped", "reason": "not in --steps"}
        elif limit < MIN_STEP_S:
            result = {"status": "skipped", "reason": "out of time budget"}
        else:
            start = time.monotonic()
            try:
                result = fn(limit)
            except Exception as err:  # the check goes on with the next step
                result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
                result["traceback"] = traceback.format_exc()[-2000:]
            result["seconds"] = round(time.monotonic() - start, 2)
            result["limit_s"] = round(limit, 1)
        self.record["steps"][name] = result
        line = result["status"] + (f": {result['reason']}" if result.get("reason") else "")
        self.record["summary"][name] = line
        self.record["wall_s"] = round(time.monotonic() - self.start, 2)
        write_json(self.json_path, self.record)
        print(f"[gpu_check] {name}: {line} ({result.get('seconds', 0)} s)", flush=True)

    def outcome(self, run: dict, figures: dict | None = None, reason: str = "") -> dict:
        """ok / failed / timeout from a subprocess run, with its figures and output tail."""
        status = "ok" if run["rc"] == 0 else "timeout" if run["timed_out"] else "failed"
        if status != "ok" and not reason:
            reason = f"exit code {run['rc']}" if status == "failed" else "over its time limit"
        result = {"status": status, "figures": figures or {}, "rc": run["rc"]}
        if reason:
            result["reason"] = reason
        if status != "ok":
            result["log_tail"] = run["tail"]
        return result

    # ------------------------------------------------------------------------- steps

    def install(self, limit: float) -> dict:
        wheels = Path(self.args.wheels)
        reqs = wheels / "requirements.txt"
        figures: dict = {}
        if not self.cuda:
            probe = self.probe(limit)
            return {"status": "skipped", "reason": "no CUDA", "figures": probe}
        if not reqs.exists():
            raise FileNotFoundError(f"{reqs} missing: run bash benchmarks/fetch_gpu_wheels.sh")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-compile"]
        pip += ["--disable-pip-version-check"]
        found = [str(p) for p in sorted((wheels / "wheels").glob("*.whl"))]
        figures["wheels"] = len(found)
        run = self.run(
            "install", [*pip, "--find-links", str(wheels / "wheels"), "-r", str(reqs)], limit
        )
        figures["install_s"] = run["seconds"]
        if run["rc"] == 0:
            figures["method"] = "resolved against the image (--find-links, --no-index)"
        else:
            figures["resolver_failed"] = run["tail"][-1500:]
            target = str(self.tmp / "site")
            rest = max(MIN_STEP_S, limit - run["seconds"])
            run = self.run("install_target", [*pip, "--no-deps", "--target", target, *found], rest)
            figures["method"] = f"--no-deps --target {target} on PYTHONPATH"
            self.python_path.append(target)
            if run["rc"] != 0:
                return self.outcome(run, figures, "pip install failed both ways")
        figures.update(self.probe(max(MIN_STEP_S, limit - run["seconds"])))
        bad = figures.get("import_errors")
        return {
            "status": "failed" if bad else "ok",
            "figures": figures,
            **({"reason": f"imports fail: {sorted(bad)}"} if bad else {}),
        }

    def probe(self, limit: float) -> dict:
        """Versions, imports and `pip check` in the environment the later steps get."""
        code = (
            "import importlib, importlib.metadata as md, json, torch\n"
            f"names, mods = {list(VERSIONS)!r}, {list(IMPORTS)!r}\n"
            "v = {}\n"
            "for n in names:\n"
            "    try: v[n] = md.version(n)\n"
            "    except Exception: v[n] = None\n"
            "errors = {}\n"
            "for m in mods:\n"
            "    try: importlib.import_module(m)\n"
            "    except Exception as e: errors[m] = f'{type(e).__name__}: {e}'[:300]\n"
            "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None\n"
            "print('PROBE' + json.dumps({'versions': v, 'import_errors': errors, 'gpu': gpu}))\n"
        )
        run = self.run("probe", [sys.executable, "-c", code], min(limit, 90))
        found = re.findall(r"^PROBE(.*)$", run["tail"], re.M)
        figures = json.loads(found[-1]) if found else {"probe_failed": run["tail"][-1000:]}
        check = self.run("pip_check", [sys.executable, "-m", "pip", "check"], 60)
        figures["pip_check"] = check["tail"].strip()[-1500:]
        return figures

    def pytest(self, limit: float) -> dict:
        files = sorted(
            str(p.relative_to(ROOT))
            for p in (ROOT / "tests").glob("test_*.py")
            if "mark.gpu" in p.read_text()
        )
        base = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q"]
        if not self.cuda:  # still prove the gpu tests collect (imports, marks, fixtures)
            run = self.run("pytest", [*base, "--collect-only", *files], limit)
            ids = [line for line in run["tail"].splitlines() if "::" in line]
            figures = {"files": files, "collected": len(ids), "tests": ids}
            if run["rc"] != 0:
                return self.outcome(run, figures, "gpu tests do not collect")
            return {"status": "skipped", "reason": "no CUDA", "figures": figures}
        xml = self.tmp / "pytest.xml"
        run = self.run("pytest", [*base, "-rfE", f"--junitxml={xml}", *files], limit)
        figures = {"files": files, **junit_outcomes(xml)}
        return self.outcome(run, figures)

    def analysis_cmd(self, steps: str, json_path: Path) -> list[str]:
        cmd = [sys.executable, "benchmarks/gpu_analysis.py", "--device", self.args.device]
        cmd += ["--steps", steps, "--json", str(json_path), "--data-root", self.args.data_root]
        if self.args.small:
            cmd.append("--small")
        if not self.cuda:
            cmd += ["--threads", "1"]
        return cmd

    def analysis(self, limit: float) -> dict:
        path = self.tmp / "analysis.json"
        run = self.run("analysis", self.analysis_cmd("analysis,surgery,generate", path), limit)
        figures = read_json(path)
        total = figures.get("analysis", {}).get("analysis_total_s")
        if total is not None:
            figures["analysis_under_goal"] = total < 120
        return self.outcome(run, figures)

    def quantize(self, limit: float) -> dict:
        path = self.tmp / "quantize.json"
        cmd = [sys.executable, "benchmarks/gpu_check.py", "quantize-worker", "--json", str(path)]
        cmd += ["--device", self.args.device, "--data-root", self.args.data_root]
        cmd += ["--limit", str(self.args.limit)] + (["--small"] if self.args.small else [])
        run = self.run("quantize", cmd, limit)
        figures = read_json(path)
        failed = [n for n, r in figures.items() if r.get("status") == "failed"]
        missing = [n for n in QUANTIZERS if n not in figures]
        reason = ""
        if failed or (missing and run["rc"] != 0):
            reason = f"failed: {failed}" + (f"; not reached: {missing}" if missing else "")
        return self.outcome(run, figures, reason)

    def throughput(self, limit: float) -> dict:
        path = self.tmp / "throughput.json"
        run = self.run("throughput", self.analysis_cmd("throughput", path), limit)
        return self.outcome(run, read_json(path))


def junit_outcomes(xml: Path) -> dict:
    """passed / failed / skipped / error counts and each non-passing test with its message."""
    if not xml.exists():
        return {"junit": "missing"}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    details = {}
    for case in ET.parse(xml).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        kind = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
        counts[kind] += 1
        if kinds:
            node = case.find(kinds[0])
            details[name] = f"{kind}: {(node.get('message') or '')[:300]}"
    return {**counts, "not_passed": details}


# ----------------------------------------------------------------------------- quantize worker

TEXTS_FALLBACK = ["The quick brown fox jumps over the lazy dog.", "Question: yes or no? Answer:"]


def piqa_texts(data_root: str, n: int) -> list[str]:
    """Calibration prompts from the carried piqa rows (goal + first solution)."""
    file = Path(data_root) / "baber" / "piqa" / "default" / "validation.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines()[:n] if line.strip()]
    return [f"{r['goal']} {r['sol1']}" for r in rows] or TEXTS_FALLBACK


def quantize_worker(args: argparse.Namespace) -> int:
    """Quantize fresh copies of one small random Llama with each quantizer and score each."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mka_exp.calibration import tokenize
    from mka_exp.evaluation.harness import known_tasks
    from mka_exp.evaluation.hf import evaluate
    from mka_exp.models.toy import build_random_model

    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("quantize-worker: --device cuda but CUDA is not available")
    shape = {"num_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4}
    if not args.small:
        shape = {"num_layers": 4, "hidden_size": 512, "intermediate_size": 1024, "num_heads": 8}
    dtype = "bfloat16" if cuda else "float32"

    def fresh():
        with torch.device(device):
            return build_random_model(device=device, dtype=dtype, num_kv_heads=2, **shape)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    lm = fresh()
    calib = tokenize(piqa_texts(args.data_root, 16), lm.tokenizer, 64, "piqa_rows", 4)
    probe = calib.input_ids[:2].to(device)
    with torch.no_grad():
        dense_logits = lm.model(probe).logits.float().flatten()
    del lm
    start = time.perf_counter()
    known_tasks()  # lm-eval's task index, once per process: kept out of the first eval_s
    results: dict = {
        "task_index": {"status": "ok", "seconds": round(time.perf_counter() - start, 3)}
    }
    for name in QUANTIZERS:
        if name.startswith("bnb") and not cuda:
            results[name] = {"status": "skipped", "reason": "no CUDA"}
            write_json(Path(args.json), results)
            continue
        try:
            lm = fresh()
            quantizer = instantiate(OmegaConf.load(ROOT / "conf" / "quant" / f"{name}.yaml"))
            sync()
            start = time.perf_counter()
            model, stats = quantizer.quantize(lm.model, lm.tokenizer, calib)
            sync()
            quantize_s = time.perf_counter() - start
            with torch.no_grad():
                logits = model(probe).logits.float().flatten()
            cosine = float(torch.nn.functional.cosine_similarity(logits, dense_logits, dim=0))
            start = time.perf_counter()
            metrics = evaluate(
                model,
                lm.tokenizer,
                ["piqa"],
                limit=args.limit,
                batch_size=8,
                data_root=args.data_root,
            )
            sync()
            down = model.model.layers[0].mlp.down_proj
            results[name] = {
                "status": "ok",
                "quantize_s": round(quantize_s, 3),
                "eval_s": round(time.perf_counter() - start, 3),
                "piqa_acc": metrics.get("piqa/acc"),
                "piqa_limit": args.limit,
                "logit_cosine_vs_dense": round(cosine, 5),
                "param_devices": sorted({p.device.type for p in model.parameters()}),
                "down_proj_class": type(down).__name__,
                "stats": stats,
            }
            if cuda:
                results[name]["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            del model, lm
        except Exception as err:
            results[name] = {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}"[:800],
                "traceback": traceback.format_exc()[-2500:],
            }
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        write_json(Path(args.json), results)
        print(f"quantize {name}: {json.dumps(results[name], default=str)[:400]}", flush=True)
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


# ----------------------------------------------------------------------------- entry


def parse_args(argv=None) -> argparse.Namespace:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["quantize-worker"]:
        parser = argparse.ArgumentParser(prog="gpu_check.py quantize-worker")
        parser.add_argument("--json", required=True)
        parser.add_argument("--device", default="cuda")
        parser.add_argument("--data-root", required=True)
        parser.add_argument("--limit", type=int, default=20)
        parser.add_argument("--small", action="store_true")
        args = parser.parse_args(argv[1:])
        args.worker = True
        return args
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the dry run")
    parser.add_argument("--small", action="store_true", help="tiny shapes (the dry run)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    parser.add_argument("--wheels", default=".gpu_wheels", help="fetch_gpu_wheels.sh's folder")
    parser.add_argument("--data-root", default=None, help="default: <wheels>/data, else ../shared")
    parser.add_argument("--limit", type=int, default=None, help="piqa rows per quantizer score")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all steps")
    args = parser.parse_args(argv)
    args.worker = False
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; allowed: {', '.join(STEPS)}")
    if args.data_root is None:
        carried = Path(args.wheels) / "data"
        beside = ROOT.parent / "shared" / "benchmarks"
        args.data_root = str(carried if carried.is_dir() else beside)
    if args.limit is None:
        args.limit = 6 if args.small else 20
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return quantize_worker(args)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check.py: CUDA is not available here; this check is for the device machine "
                "(bash benchmarks/gpu_check.sh). Dry run without a GPU: "
                "python benchmarks/gpu_check.py --device cpu --small --out DIR",
                file=sys.stderr,
            )
            return 2
    check = Check(args)

    def stop(signum, frame):
        if check.current is not None:
            Check.kill(check.current)
        check.record["stopped_by_signal"] = signum
        write_json(check.json_path, check.record)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    for name in STEPS:
        check.step(name, getattr(check, name))
    summary = check.record["summary"]
    width = max(map(len, summary))
    print("\n".join(f"{name:<{width}}  {line}" for name, line in summary.items()))
    print(f"wall {check.record['wall_s']} s; figures in {check.json_path}")
    return (
        1
        if any(r["status"] in ("failed", "timeout") for r in check.record["steps"].values())
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
