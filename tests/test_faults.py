"""Faults a long sweep meets: damaged caches, an unreachable wandb server, a failed job under a
submitit launcher, and an output root with one damaged state file of every kind."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mka_exp import activations, pipeline
from mka_exp.activations import capture_hidden_states
from mka_exp.calibration import tokenize
from mka_exp.methods.mka import MKA
from mka_exp.models.toy import build_random_model
from mka_exp.results import claims
from mka_exp.results import records as results
from mka_exp.results import table as results_table
from tests.helpers import REPO_ROOT, compose_config

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Layers that compute nearly the same function can be merged.",
    "Manifold learning finds structure in high-dimensional data.",
]
SHRINK = ["eval.tasks=[piqa]", "eval.limit=4"]


def calib_of(tokenizer):
    return tokenize(TEXTS, tokenizer, max_length=32, name="t", batch_size=2)


def damage(path, how: str) -> None:
    """Cut the file short, overwrite its middle with random bytes, or replace it."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbled":
        middle = len(data) // 2
        noise = random.Random(0).randbytes(64)
        path.write_bytes(data[:middle] + noise + data[middle + 64 :])
    elif how == "random":
        path.write_bytes(random.Random(1).randbytes(len(data)))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("how", ["truncated", "garbled", "random", "other_shape", "nan"])
def test_damaged_activation_cache_is_named_deleted_and_recomputed(tiny, tmp_path, caplog, how):
    calib = calib_of(tiny.tokenizer)
    fresh = capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    (path,) = tmp_path.glob("hidden_*.pt")
    if how == "other_shape":  # loads fine, holds something else (an old format, another model)
        torch.save(torch.zeros(3, 2, 64), path)
    elif how == "nan":
        torch.save(torch.full_like(fresh, float("nan")), path)
    else:
        damage(path, how)
    with caplog.at_level(logging.WARNING):
        again = capture_hidden_states(tiny.model, calib, "tokens", cache=tmp_path)
    assert torch.equal(again, fresh)
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and "weights_only" not in caplog.text
    assert (
        activations.load_cache(path, path.stem.removeprefix("hidden_"), tuple(fresh.shape))
        is not None
    )


def test_cache_checks_shape_key_checksum_and_finiteness(tiny, tmp_path):
    from mka_exp.activations import cache_problem, save_cache, tensor_crc

    tensor = torch.randn(3, 4)
    path = tmp_path / "c.pt"
    save_cache(tensor, path, "k")
    entry = torch.load(path, weights_only=True)
    assert cache_problem(entry, "k", (3, None)) is None
    assert "made for key" in cache_problem(entry, "other", (3, 4))
    assert "shape [3, 4]" in cache_problem(entry, "k", (5, 4))
    assert cache_problem({**entry, "crc32": 0}, "k", (3, 4)) == "checksum mismatch"
    bad = tensor.clone()
    bad[0, 0] = float("inf")
    assert cache_problem({**entry, "tensor": bad, "crc32": tensor_crc(bad)}, "k", (3, 4)) == (
        "non-finite values"
    )


@pytest.mark.parametrize("how", ["truncated", "random", "other_shape"])
def test_damaged_similarity_cache_is_named_deleted_and_recomputed(tmp_path, caplog, how):
    def model():
        return build_random_model("llama", num_layers=4, hidden_size=64, device="cpu").model

    tokenizer = build_random_model("llama", num_layers=1, device="cpu").tokenizer
    calib = calib_of(tokenizer)
    first = MKA(num_layers=2, cache=str(tmp_path)).compress(model(), calib)
    paths = sorted(tmp_path.glob("npib_*.pt"))
    assert len(paths) == 2
    for path in paths:
        if how == "other_shape":
            torch.save(torch.eye(7), path)
        else:
            damage(path, how)
    with caplog.at_level(logging.WARNING):
        second = MKA(num_layers=2, cache=str(tmp_path)).compress(model(), calib)
    assert second == first
    warnings = warnings_of(caplog)
    assert len(warnings) == 2 and all(str(p) in w for p, w in zip(paths, warnings, strict=True))
    assert "weights_only" not in caplog.text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def count_wandb_inits(monkeypatch):
    import wandb

    modes = []
    real = wandb.init

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    monkeypatch.setattr(pipeline, "TRACKERS", {})
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return modes


def wandb_curve(tmp_path, data_root, *extra):
    cfg = compose_config(
        ["method=reverse_prune", "curve=[0.25,0.5,0.75]", "logger=wandb", "logger.mode=online"]
        + [*SHRINK, *extra],
        tmp_path,
        data_root,
    )
    return pipeline.run(cfg)


def test_unreachable_wandb_is_found_out_once_per_process(
    tmp_path, data_root, monkeypatch, caplog, count_wandb_inits
):
    """A closed port: no online init is tried at all (the probe fails at once), one warning,
    every point logs offline and is recorded."""
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    with caplog.at_level(logging.WARNING):
        last = wandb_curve(tmp_path, data_root)
    assert count_wandb_inits == ["offline"] * 3
    unreachable = [w for w in warnings_of(caplog) if "wandb server unreachable" in w]
    assert len(unreachable) == 1, warnings_of(caplog)
    assert last["layers_after"] == 1 and len(list((tmp_path / "records").glob("*.json"))) == 3
    assert len(list((tmp_path / "run").glob("ratio_*/wandb/offline-run-*"))) == 3


def test_wandb_server_that_never_answers_costs_one_init_timeout(
    tmp_path, data_root, monkeypatch, caplog, count_wandb_inits
):
    """The port accepts connections but never answers: one online init (short timeout), then
    offline for the rest of the process."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        with caplog.at_level(logging.WARNING):
            wandb_curve(tmp_path, data_root, "logger.init_timeout=2")
    finally:
        server.close()
    assert count_wandb_inits == ["online", "offline", "offline", "offline"]
    assert len([w for w in warnings_of(caplog) if "wandb server unreachable" in w]) == 1
    assert len(list((tmp_path / "records").glob("*.json"))) == 3


def test_local_launcher_sweep_reports_a_bad_point_and_runs_the_rest(tmp_path, data_root):
    """The same as with the basic launcher, with every job in its own submitit process."""
    args = [
        sys.executable, "run.py", "-m", "hydra/launcher=local", "model=tiny_llama", "logger=none",
        "method=reverse_prune", "method.ratio=0.05,0.5", "eval.tasks=[piqa]", "eval.limit=2",
        "calib.max_length=32", f"data_root={data_root}", f"paths.output_root={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:]
    summary = done.stdout[done.stdout.index("1 of 2 sweep job(s) failed") :]
    assert "method.ratio=0.05 " in summary and "ValueError: method.ratio=0.05 removes 0" in summary
    (record,) = (tmp_path / "records").glob("*.json")
    assert json.loads(record.read_text())["layers_after"] == 2
    assert len(list((tmp_path / "failures").glob("*.json"))) == 1


def test_chaos_every_damaged_state_file_is_recovered(tmp_path, data_root, monkeypatch, caplog):
    """One damaged file of each kind in an output root (table, record, activation cache,
    similarity cache, failure marker); a rerun keeps every finished point, recomputes every
    damaged one and duplicates nothing."""
    curve = ["method=mka", "curve=[0.25,0.5,0.75]", *SHRINK]
    real = pipeline.measure_point

    def fail_at_last(point, *args, **kwargs):
        if point.cfg.method.ratio == 0.75:
            raise RuntimeError("simulated crash at the last point")
        return real(point, *args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_point", fail_at_last)
    with pytest.raises(RuntimeError):
        pipeline.run(compose_config(curve, tmp_path, data_root))
    records = {p.stem: p for p in (tmp_path / "records").glob("*.json")}
    (failure,) = (tmp_path / "failures").glob("*.json")
    assert len(records) == 2 and failure.stem not in records
    kept, broken = sorted(records, key=lambda k: json.loads(records[k].read_text())["layers_after"])
    kept_text = records[kept].read_text()
    similarity = next((tmp_path / "cache").glob("npib_*.pt"))  # npib_<key>_<options>.pt
    damaged = {
        "table": tmp_path / "results.csv",
        "record": records[broken],
        "similarity": similarity,  # damaged: recomputed from the activations of the same key
        "activations": tmp_path / "cache" / f"hidden_{similarity.stem.split('_')[1]}.pt",
        "failure": failure,
    }
    for name, path in damaged.items():
        damage(path, "random" if name == "table" else "truncated")

    evaluated = []
    monkeypatch.setattr(pipeline, "measure_point",
                        lambda p, *a, **k: evaluated.append(p.key) or real(p, *a, **k))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        pipeline.run(compose_config(curve, tmp_path, data_root))

    assert sorted(evaluated) == sorted([broken, failure.stem])  # damaged and failed: recomputed
    assert records[kept].read_text() == kept_text  # finished: untouched
    table = results_table.read_table(tmp_path / "results.csv")
    keys = sorted(p.stem for p in (tmp_path / "records").glob("*.json"))
    assert sorted(table["config_hash"]) == keys and len(keys) == 3  # one row per point
    assert sorted(table["layers_after"]) == [1, 2, 3]
    assert not list((tmp_path / "failures").glob("*.json"))
    assert (tmp_path / "records" / f"{broken}.json.damaged").exists()
    text = "\n".join(warnings_of(caplog))
    for name, path in damaged.items():
        assert str(path) in text, (name, text)
    assert "weights_only" not in caplog.text


@pytest.mark.parametrize("mode", [[], ["-m"]])
def test_output_root_under_a_file_is_one_line_before_hydra_makes_the_run_dir(tmp_path, mode):
    """Hydra creates the run directory before the job starts, so the pipeline's own checks come
    too late for `paths.output_root`; a callback checks it first."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    args = [sys.executable, "run.py", *mode, "model=tiny_llama", "logger=none",
            f"paths.output_root={blocker}/out"]  # fmt: skip
    done = subprocess.run(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout[-3000:]
    assert done.stdout.strip().splitlines() == [
        f"ERROR: ConfigError: paths.output_root='{blocker}/out': {blocker} is a file, not a "
        "directory; "
        "allowed: a directory you can write to"
    ]


# --- signals and a full disk (issue 31) ------------------------------------------------------

CURVE = ["method=reverse_prune", "curve=[0.25,0.5,0.75]", *SHRINK]
MEASURE = pipeline.measure_point


def at_second_point(monkeypatch, action) -> None:
    """Run `action` when the curve's second point starts measuring (the first is recorded)."""
    real = MEASURE

    def measure(point, *args, **kwargs):
        if point.cfg.method.ratio == 0.5:
            action()
        return real(point, *args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_point", measure)


def errors_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_abandons_the_point_and_says_how_to_resume(
    tmp_path, data_root, monkeypatch, caplog, sig, code
):
    """What Slurm sends at a time limit or preemption (SIGTERM), or Ctrl-C: the point being
    computed is dropped (no record, no failure marker), one line lists what is done, and the
    exit status is 128 + the signal; the handlers are restored afterwards."""
    at_second_point(monkeypatch, lambda: os.kill(os.getpid(), sig))
    before = signal.getsignal(sig)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        pipeline.main(compose_config(CURVE, tmp_path, data_root))
    assert stop.value.code == code
    (line,) = errors_of(caplog)
    assert line == (
        f"{sig.name}: stopped; the point being computed was abandoned, nothing of it recorded; "
        "1 of 3 point(s) recorded: ratio 0.25; not done: ratio 0.5, ratio 0.75. Resume: run the "
        "same command again (finished points are skipped)"
    )
    assert len(results.record_keys(tmp_path)) == 1 and not (tmp_path / "failures").exists()
    assert signal.getsignal(sig) is before
    evaluated = []
    at_second_point(monkeypatch, lambda: evaluated.append(1))
    pipeline.run(compose_config(CURVE, tmp_path, data_root))
    assert len(results.record_keys(tmp_path)) == 3 and evaluated == [1]


def test_a_launcher_handler_that_ends_the_job_at_a_time_limit_stops_it_like_sigterm(
    tmp_path, data_root, monkeypatch, caplog
):
    """submitit answers Slurm's warning before a time limit (SIGUSR2) by raising
    `UncompletedJobError` wherever the run is; it was recorded as a failure of every unfinished
    point. It stops the run like SIGTERM (tests/test_slurm_faults.py: the same on Slurm)."""

    def submitit_at_time_limit(signum, frame):
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    at_second_point(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGUSR2))
    before = signal.signal(signal.SIGUSR2, submitit_at_time_limit)
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
            pipeline.main(compose_config(CURVE, tmp_path, data_root))
        assert signal.getsignal(signal.SIGUSR2) is submitit_at_time_limit  # restored
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert stop.value.code == 128 + signal.SIGUSR2
    (line,) = errors_of(caplog)
    assert line.startswith("SIGUSR2: stopped; the point being computed was abandoned")
    assert "1 of 3 point(s) recorded: ratio 0.25; not done: ratio 0.5, ratio 0.75." in line
    assert len(results.record_keys(tmp_path)) == 1 and not (tmp_path / "failures").exists()


def full_disk_at(suffix: str):
    """`os.replace` that finds the disk full when moving a file ending in `suffix` into place
    after the first record exists (the curve's second point)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        records = list(Path(dst).parent.glob("*.json"))
        if str(dst).endswith(suffix) and records:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    return replace


def test_a_full_disk_names_the_path_and_free_space_and_stops_the_curve(
    tmp_path, data_root, monkeypatch, caplog
):
    monkeypatch.setattr(os, "replace", full_disk_at(".samples.jsonl.gz"))
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        pipeline.main(compose_config(CURVE, tmp_path, data_root))
    assert stop.value.code == 1
    (line,) = errors_of(caplog)
    (first,) = results.record_keys(tmp_path)
    assert line.startswith(f"DiskFull: no space left on device writing {tmp_path}/records/")
    assert f" free on {tmp_path}/records); 1 of 3 point(s) recorded: ratio 0.25; not done: " in (
        line
    )
    assert line.endswith("Free space, then run the same command again (finished points are "
                         "skipped)")  # fmt: skip
    assert "Traceback" not in caplog.text
    assert results_table.read_table(tmp_path / "results.csv")["config_hash"].tolist() == [first]


SITE_FULL_DISK = """import errno, os
from pathlib import Path

_real = os.replace


def _replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".samples.jsonl.gz") and list(Path(dst).parent.glob("*.json")):
        raise OSError(errno.ENOSPC, "No space left on device")
    return _real(src, dst, *args, **kwargs)


os.replace = _replace
"""


def sweep_with_site(
    tmp_path: Path, data_root: Path, site_code: str, ratios: str, out: Path
) -> subprocess.CompletedProcess:
    """A tiny `-m` sweep over `ratios` into `out`, with `site_code` as its sitecustomize (a fault
    planted in the process); stdout and stderr together."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(site_code)
    args = [
        sys.executable, "run.py", "-m", "model=tiny_llama", "logger=none",
        "method=reverse_prune", f"method.ratio={ratios}", "eval.tasks=[piqa]", "eval.limit=2",
        "calib.max_length=32", f"data_root={data_root}", f"paths.output_root={out}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO_ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)  # fmt: skip


def test_a_full_disk_stops_a_sweep_with_its_summary(tmp_path, data_root):
    """The second job of three finds the disk full: it is recorded as failed, the sweep stops
    there (the third would fail the same way) with its summary, exit 1, no traceback."""
    out = tmp_path / "out"
    done = sweep_with_site(tmp_path, data_root, SITE_FULL_DISK, "0.25,0.5,0.75", out)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "Traceback" not in done.stdout
    assert "sweep stopped at job 1: the disk is full (DiskFull: no space left on device " in (
        done.stdout
    )
    assert "1 of 2 sweep job(s) failed" in done.stdout
    assert "method.ratio=0.75" not in done.stdout.split("sweep stopped")[0].split("#2 :")[-1]
    assert "#2 : " not in done.stdout  # the third job never started
    assert len(results.record_keys(out)) == 1


# --- sweeps that share work: claims (issue 31) ------------------------------------------------


def curve_keys(tmp_path, data_root) -> dict[float, str]:
    cfg = compose_config(CURVE, tmp_path, data_root)
    points = pipeline.plan_points(cfg, pipeline.curve_points(cfg))
    return {p.cfg.method.ratio: p.key for p in points}


def write_claim(records_dir, key: str, host: str, pid: int, age: float = 0.0):
    path = claims.claim_path(records_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time()}))
    os.utime(path, (time.time() - age,) * 2)
    return path


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize("how", ["process gone", "no heartbeat"])
def test_a_killed_runs_claim_is_taken_over(tmp_path, data_root, monkeypatch, caplog, how):
    """A claim left by a SIGKILLed job: on this host its pid is gone (taken over at once), on
    another host its heartbeat stopped (taken over after STALE_S)."""
    key = curve_keys(tmp_path, data_root)[0.5]
    if how == "process gone":
        write_claim(tmp_path, key, claims.HOST, dead_pid())
    else:
        write_claim(tmp_path, key, "node-17", 4242, age=claims.STALE_S + 5)
    with caplog.at_level(logging.WARNING):
        pipeline.run(compose_config(CURVE, tmp_path, data_root))
    assert len(results.record_keys(tmp_path)) == 3
    (warning,) = [w for w in warnings_of(caplog) if "claim" in w]
    reason = "on this host is gone" if how == "process gone" else "no heartbeat for"
    assert f"point {key}: the claim of " in warning and reason in warning
    assert "this run takes it over" in warning
    assert not list((tmp_path / "claims").iterdir())  # released


def test_a_curve_skips_a_claimed_point_and_waits_for_it(tmp_path, data_root, monkeypatch, caplog):
    """Another run (a live claim on another host) computes ratio 0.5: this curve computes the
    others, then waits; the other run dies (its heartbeat stops), so this run computes 0.5
    after all. Every point is computed once and recorded once."""
    monkeypatch.setattr(claims, "POLL_S", 0.05)
    keys = curve_keys(tmp_path, data_root)
    claim = write_claim(tmp_path, keys[0.5], "node-17", 4242)
    evaluated = []
    real = MEASURE

    def measure(point, *args, **kwargs):
        evaluated.append(point.cfg.method.ratio)
        if len(evaluated) == 2:  # both free points done: the other run dies now
            os.utime(claim, (time.time() - claims.STALE_S - 5,) * 2)
        return real(point, *args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_point", measure)
    with caplog.at_level(logging.INFO):
        pipeline.run(compose_config(CURVE, tmp_path, data_root))
    assert evaluated == [0.25, 0.75, 0.5]
    text = caplog.text
    assert "point ratio 0.5 is being computed by node-17:4242; this run goes on" in text
    assert "waiting for 1 point(s) that other runs (node-17:4242) are computing: ratio 0.5" in text
    assert f"point {keys[0.5]}: the claim of node-17:4242 is stale (no heartbeat for" in text
    assert sorted(results.record_keys(tmp_path)) == sorted(keys.values())
    assert len(results_table.read_table(tmp_path / "results.csv")) == 3


def test_a_point_recorded_by_the_other_run_is_not_computed(tmp_path, data_root, monkeypatch):
    """A run whose only point is claimed loads no model and takes the other run's record."""
    monkeypatch.setattr(claims, "POLL_S", 0.05)
    first = pipeline.run(compose_config(["method=reverse_prune", *SHRINK], tmp_path, data_root))
    record = results.record_path(tmp_path, first["config_hash"])
    text = record.read_text()
    record.unlink()  # as if the other run were still computing it
    write_claim(tmp_path, first["config_hash"], "node-17", 4242)

    def finish_later():
        time.sleep(0.5)
        record.write_text(text)

    monkeypatch.setattr(pipeline, "load_session", lambda *a, **k: pytest.fail("model loaded"))
    threading.Thread(target=finish_later, daemon=True).start()
    again = pipeline.run(compose_config(["method=reverse_prune", *SHRINK], tmp_path, data_root))
    assert again == first


def test_two_overlapping_sweeps_compute_each_point_once(tmp_path, data_root):
    """Two sweeps started together over the same three points, in opposite orders."""
    procs = []
    for order in ("0.25,0.5,0.75", "0.75,0.5,0.25"):
        args = [
            sys.executable, "run.py", "-m", "model=tiny_llama", "logger=none",
            "method=reverse_prune", f"method.ratio={order}", "eval.tasks=[piqa]",
            "eval.limit=2", "calib.max_length=32", f"data_root={data_root}",
            f"paths.output_root={tmp_path}",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    computed = sum(out.count("piqa/acc_norm") for out in outs)  # a summary per computed point
    assert computed == 3, outs
    assert len(results.record_keys(tmp_path)) == 3
    assert len(results_table.read_table(tmp_path / "results.csv")) == 3
    assert not list((tmp_path / "claims").iterdir())


def test_a_sweep_defers_a_claimed_point_to_its_end(tmp_path, data_root):
    """Basic launcher: the job whose point another run (node-17) computes is deferred, the next
    job runs first; at the sweep's end the claim has gone stale (that run died), so the sweep
    takes it over and computes it."""
    overrides = ["method=reverse_prune", "eval.tasks=[piqa]"]
    keys = {
        ratio: pipeline.plan_points(cfg, [cfg])[0].key
        for ratio in (0.25, 0.5)
        for cfg in [compose_config([*overrides, f"method.ratio={ratio}"], tmp_path, data_root)]
    }
    claim = write_claim(tmp_path, keys[0.25], "node-17", 4242)
    args = [
        sys.executable, "run.py", "-m", "model=tiny_llama", "logger=none", *overrides,
        "method.ratio=0.25,0.5", "calib.max_length=64", "eval.limit=4", "eval.batch_size=4",
        f"data_root={data_root}", f"paths.output_root={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKA_EXP_CLAIM_STALE_S": "600"}  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    second = results.record_path(tmp_path, keys[0.5])
    deadline = time.monotonic() + 600
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.utime(claim, (time.time() - 3600,) * 2)  # node-17's run died: its heartbeat stopped
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    deferred = out.index(f"point(s) {keys[0.25]}: being computed by other runs; this job is "
                         "deferred to the end of the sweep")  # fmt: skip
    taken = out.index(f"point {keys[0.25]}: the claim of node-17:4242 is stale")
    summaries = [i for i in range(len(out)) if out.startswith("piqa/acc_norm", i)]
    assert len(summaries) == 2 and deferred < summaries[0] < taken < summaries[1]
    assert sorted(results.record_keys(tmp_path)) == sorted(keys.values())
    assert not list(tmp_path.glob("multirun/*/*/*/deferred.json"))


SITE_DISK_FILLS = """import shutil
from pathlib import Path

_real = shutil.disk_usage


def _usage(path):
    usage = _real(path)
    if list(Path(path).glob("records/*.json")) or Path(path).name == "records":
        return usage._replace(free=20 * 1024)  # the disk filled once the first point was recorded
    return usage


shutil.disk_usage = _usage
"""


def test_a_disk_that_fills_between_jobs_stops_the_sweep_with_its_summary(tmp_path, data_root):
    """The first job finishes, the disk is then full: the sweep stops before Hydra writes the
    next job's directory (which would fail with a traceback), with one summary, exit 1."""
    out = tmp_path / "out"
    done = sweep_with_site(tmp_path, data_root, SITE_DISK_FILLS, "0.25,0.5", out)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "Traceback" not in done.stdout
    assert (f"sweep stopped at job 0: the disk is full (paths.records_dir='{out}': only 0.02 MB "
            f"free on {out}") in done.stdout  # fmt: skip
    assert "#1 : " not in done.stdout and len(results.record_keys(out)) == 1
