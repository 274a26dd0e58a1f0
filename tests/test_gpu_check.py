"""benchmarks/gpu_check.py: its CPU dry run (slow tier, so the device check cannot rot) and the
time-boxing of its steps (fast)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def make_check(tmp_path, budget=60.0):
    args = gpu_check.parse_args(
        ["--device", "cpu", "--out", str(tmp_path), "--budget", str(budget)]
    )
    return gpu_check.Check(args)


def test_a_step_over_its_limit_is_killed_and_recorded(tmp_path):
    check = make_check(tmp_path)
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    start = time.monotonic()
    run = check.run("sleeper", sleeper, limit=1)
    assert time.monotonic() - start < 15
    assert run["timed_out"] and run["rc"] != 0 and "started" in run["tail"]
    result = check.outcome(run)
    assert (result["status"], result["reason"]) == ("timeout", "over its time limit")
    assert "started" in (tmp_path / "gpu_check.log").read_text()


def test_no_subprocess_outlives_its_steps_limit(tmp_path):
    check = make_check(tmp_path)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    check.step_deadline = time.monotonic() + 1  # as step() sets it
    start = time.monotonic()
    first = check.run("first", sleeper, limit=30)
    second = check.run("second", sleeper, limit=30)
    assert time.monotonic() - start < 15
    assert first["timed_out"] and second["timed_out"] and second["rc"] is None
    assert check.outcome(second)["status"] == "timeout"


def test_a_failing_step_is_recorded_and_the_next_step_runs(tmp_path):
    check = make_check(tmp_path, budget=1000)
    check.args.steps = ["install", "pytest"]

    def broken(limit):
        raise RuntimeError("no wheels here")

    check.step("install", broken)
    check.step("pytest", lambda limit: {"status": "ok", "figures": {"limit": limit}})
    check.step("analysis", broken)  # not in --steps
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["summary"] == {
        "install": "failed: RuntimeError: no wheels here",
        "pytest": "ok",
        "analysis": "skipped: not in --steps",
    }
    assert "no wheels here" in record["steps"]["install"]["traceback"]
    assert record["steps"]["pytest"]["figures"]["limit"] == gpu_check.CAPS_S["pytest"]


def test_steps_past_the_budget_are_skipped(tmp_path):
    check = make_check(tmp_path, budget=gpu_check.MIN_STEP_S - 1)
    check.step("analysis", lambda limit: pytest.fail("must not start"))
    assert check.record["summary"]["analysis"] == "skipped: out of time budget"


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="boom"/></testcase>'
        '<testcase classname="t" name="c"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    got = gpu_check.junit_outcomes(xml)
    assert (got["passed"], got["failed"], got["skipped"], got["error"]) == (1, 1, 1, 0)
    assert got["not_passed"] == {"t::b": "failed: boom", "t::c": "skipped: needs a CUDA device"}


@pytest.mark.slow
def test_cpu_dry_run_records_every_step(tmp_path, data_root):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)]
    cmd += ["--wheels", str(tmp_path / "no_wheels"), "--data-root", str(data_root)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    steps = record["steps"]
    assert list(steps) == list(gpu_check.STEPS) == list(record["summary"])
    assert record["summary"]["install"] == record["summary"]["pytest"] == "skipped: no CUDA"
    assert all(steps[s]["status"] == "ok" for s in ("analysis", "quantize", "throughput"))
    assert (out / "gpu_check.log").stat().st_size > 0

    install = steps["install"]["figures"]
    assert install["versions"]["torch"] and install["versions"]["lm_eval"]
    assert set(install["import_errors"]) <= {"bitsandbytes"}  # the CPU venv may lack it

    collected = steps["pytest"]["figures"]
    ids = collected["tests"]
    in_file = (REPO / "tests" / "test_gpu.py").read_text().count("\ndef test_")
    assert sum(i.startswith("tests/test_gpu.py::") for i in ids) == in_file >= 6
    assert any("test_bnb_quantizes_on_gpu" in i for i in ids) and collected["collected"] == len(ids)

    figures = steps["analysis"]["figures"]
    analysis = figures["analysis"]
    assert analysis["capture_s"] > 0 and analysis["similarity_s"] > 0
    assert analysis["analysis_total_s"] == pytest.approx(
        analysis["capture_s"] + analysis["similarity_s"], abs=0.002
    )
    assert figures["analysis_under_goal"] is True
    surgery = figures["surgery"]
    assert (surgery["layers_before"], surgery["layers_after"]) == (4, 2)
    assert surgery["first_merge_exact"] and surgery["params_on_device"]
    assert len(surgery["merges"]) == 1 and 0.5 < surgery["merges"][0]["lam"] < 0.74
    assert figures["generate"]["exact_agree"] is True  # float32 on the CPU: no ties

    quant = steps["quantize"]["figures"]
    for name, bits in (("none", 16), ("gptq", 4), ("awq", 4), ("smoothquant", 8)):
        entry = quant[name]
        assert entry["status"] == "ok", entry
        assert entry["stats"]["bits"] == bits and 0.0 <= entry["piqa_acc"] <= 1.0
        assert entry["param_devices"] == ["cpu"]
        if name == "none":
            assert entry["logit_cosine_vs_dense"] == pytest.approx(1.0)
        else:  # quantized: close to the dense logits, but not equal to them
            assert entry["quantize_s"] > 0 and 0.9 < entry["logit_cosine_vs_dense"] < 0.99999
    for name in ("bnb_int8", "bnb_nf4"):
        assert quant[name] == {"status": "skipped", "reason": "no CUDA"}

    lm_eval = steps["throughput"]["figures"]["throughput"]["lm_eval"]
    assert lm_eval["scored_tokens"] > 0 and lm_eval["batches"] > 0
    assert lm_eval["share_of_raw"] == pytest.approx(
        lm_eval["raw_same_batches_s"] / lm_eval["hflm_s"], rel=0.02
    )
    assert lm_eval["metrics_equal"] is True
    assert steps["throughput"]["figures"]["throughput"]["raw_random"]["tokens_per_s"] > 0
