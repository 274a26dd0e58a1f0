"""Fault battery for issue 11 ("Results that survive faults"): bad settings, damaged state files
and interrupted sweeps, each run through a checkout's own `run.py` in a fresh temporary output
root, with the tiny random model and the offline benchmark mirror.

Not a test: it prints (and writes with --out) one markdown row per case with the exit code, the
wall seconds, the most informative error/warning line of the output and an automatic outcome
("clear line, before load", "traceback", "ran", or for fault cases whether the finished points
survived: records, table rows read as strings, duplicated hashes). Run it against any checkout,
e.g. the commit before issue 11, to compare:

    python benchmarks/fault_battery.py --repo . --out battery.md [--only 3 7 ...]

With `--before OLD_CHECKOUT` every case runs against both and the row has before/after columns
(cases 56 on are issue 31's: paths, unknown keys, duplicate tasks, signals, a full disk, shared
work; 72 on, its verified inputs). The full-disk cases mount a small tmpfs and the second-user
cases drop root's CAP_DAC_OVERRIDE (setpriv), so they need root; as a user the second-user cases
drop write bits. Damaged model files (a GGUF or float32 copy changed in place or truncated) need
the real model files: `tests/test_inputs.py` covers them on small files; a local model folder
changed after a first run (the last case) uses the tiny model saved to a folder
(`tests/test_folder_seals.py` covers truncated, removed and added files and hub snapshots).

One `run.py` process at a time (the cases are sequential, except the two overlapping sweeps);
OMP_NUM_THREADS=1 is set for it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(os.environ.get("MKA_EXP_DATA_ROOT", "/work/shared/benchmarks"))
FAKE_HASHES = ["724e836309272529", "0012345678901234"]
HEADER = "| # | case | exit code | seconds | first clear error/warning line | outcome |"
BEFORE_AFTER = (
    "| # | case | before: exit | before: line | before: outcome | after: exit | after: line "
    "| after: outcome |"
)
FROZEN_TIME = """import datetime as _dt

import hydra.core.utils as _utils


class _Frozen(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)


_utils.datetime = _Frozen  # what Hydra's ${now:} resolver calls, and nothing else
"""


@dataclass
class Run:
    code: int | None  # None: timed out
    seconds: float
    out: str


@dataclass
class Ctx:
    """One case's checkout, temporary output root and settings."""

    repo: Path
    root: Path
    timeout: float
    base: dict[str, str] = field(default_factory=dict)

    def args(self, extra: list[str], multirun: bool) -> list[str]:
        over = dict(self.base)
        for item in extra:
            key, _, value = item.partition("=")
            over[key] = value
        flags = ["-m"] if multirun else []
        return [sys.executable, "run.py", *flags, *(f"{k}={v}" for k, v in over.items())]

    def env(self, extra: dict[str, str] | None, pythonpath: str | None) -> dict[str, str]:
        path = str(self.repo) if pythonpath is None else f"{pythonpath}{os.pathsep}{self.repo}"
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("MKA_EXP_OUTPUTS", None)
        return {**env, **(extra or {})}

    def run(
        self, *extra: str, env=None, multirun=False, umask=-1, pythonpath=None, prefix=()
    ) -> Run:
        start = time.monotonic()
        try:
            done = subprocess.run(
                [*prefix, *self.args(list(extra), multirun)], cwd=self.repo, timeout=self.timeout,
                env=self.env(env, pythonpath), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", umask=umask, start_new_session=True,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            out = err.output or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            return Run(None, time.monotonic() - start, out)
        return Run(done.returncode, time.monotonic() - start, done.stdout)


# --- looking at an output root ------------------------------------------------------------


def records(root: Path) -> list[Path]:
    return sorted((root / "records").glob("*.json"))


def table_hashes(root: Path) -> list[str] | str:
    """results.csv's config_hash column read as strings, or why it cannot be read."""
    import pandas as pd

    path = root / "results.csv"
    if not path.exists():
        return "no results.csv"
    try:
        table = pd.read_csv(path, dtype=str)
    except Exception as err:  # noqa: BLE001 (any failure is the finding)
        return f"unreadable ({type(err).__name__})"
    if "config_hash" not in table:
        return "no config_hash column"
    return table["config_hash"].fillna("<empty>").tolist()


def survival(root: Path, want: int) -> str:
    """Records, table rows and duplicates against the number of points that should be there."""
    recs = {p.stem for p in records(root)}
    rows = table_hashes(root)
    if isinstance(rows, str):
        return f"{len(recs)}/{want} records, table {rows}"
    dups = len(rows) - len(set(rows))
    missing = len(recs - set(rows))
    verdict = "survived" if len(recs) == want == len(rows) and not dups else "LOST/DUPLICATED"
    return (
        f"{verdict}: {len(recs)}/{want} records, {len(rows)} rows, {dups} dup, {missing} unlisted"
    )


def run_dirs(root: Path) -> set[Path]:
    return {p for p in (root / "runs").glob("*/*") if p.is_dir()}


# --- reading the output -------------------------------------------------------------------

NOISE = (
    "HYDRA_FULL_ERROR", "it/s]", "s/it]", "Traceback (most recent call last)",
    "Error executing job with overrides",
)  # fmt: skip
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit))\b(:|$)")


def line_score(line: str, hint: str, warn: bool) -> int:
    """How informative one output line is (0: not a message)."""
    text = line.strip()
    if not text or any(n in text for n in NOISE):
        return 0
    score = 0
    if "[ERROR]" in text or text.startswith("ERROR: "):  # a log record, or a line before logging
        score = 100
    elif EXCEPTION.match(text):
        score = 80
    elif re.match(r"^(Error|Could not|In '|Key '|Missing|Unable)", text):
        score = 70
    elif "[WARNING]" in text or "Warning:" in text:
        score = 90 if warn else 40
    if score and hint and hint.lower() in text.lower():
        score += 30
    return score


def message(out: str, hint: str = "", warn: bool = False) -> str:
    """The most informative line: an explicit error, a warning (damage cases), else the last
    exception line of a traceback."""
    best, best_key = "", (0, 0)
    for i, line in enumerate(out.splitlines()):
        score = line_score(line, hint, warn)
        tiebreak = i if EXCEPTION.match(line.strip()) else -i
        if score and (score, tiebreak) > best_key:
            best, best_key = line.strip(), (score, tiebreak)
    best = re.sub(r"^\[[\d\- :,]+\]\[[\w.]+\]\[(\w+)\] - ", r"\1: ", best)
    return best[:160] + ("..." if len(best) > 160 else "")


def judge(run: Run, text: str) -> str:
    if run.code is None:
        return "TIMEOUT"
    if run.code == 0:
        return "ran"
    if run.code < 0:
        return f"CRASHED (signal {-run.code})"
    if "Traceback (most recent call last)" in run.out:
        return "traceback"
    if not text:
        return "no message"
    if "stage load" not in run.out:
        return "clear line, before load"
    stage = "before compress" if "stage compress" not in run.out else "after compress"
    return f"clear line, {stage}"


# --- cases --------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    body: Callable[[Ctx], tuple[Run, str | None]]
    hint: str = ""
    warn: bool = False


CASES: list[Case] = []


def case(name: str, hint: str = "", warn: bool = False):
    def register(fn):
        CASES.append(Case(name, fn, hint, warn))
        return fn

    return register


def bad(name: str, *overrides: str, hint: str = "", multirun: bool = False) -> None:
    """A case that is one run with these overrides (the outcome: the generic judgment)."""
    key = hint or overrides[-1].split("=")[0]
    CASES.append(Case(name, lambda ctx: (ctx.run(*overrides, multirun=multirun), None), key))


def first_point(ctx: Ctx, *over: str) -> tuple[Run, Path | None]:
    """The first run of a two-run case and its one record (None when it failed)."""
    run = ctx.run(*over)
    if run.code != 0:
        return run, None
    (rec,) = records(ctx.root)
    return run, rec


@case("baseline: a plain tiny run")
def plain(ctx: Ctx):
    run = ctx.run()
    return run, f"ran, {survival(ctx.root, 1)}" if run.code == 0 else None


@case("results.csv holding only hashes of digits / with one `e`: another point's upsert")
def numeric_hashes(ctx: Ctx):
    first, rec = first_point(ctx, "method.ratio=0.25")
    if rec is None:
        return first, "first run failed"
    add_fake_points(ctx.root, rec)
    run = ctx.run("method.ratio=0.5")
    rows = table_hashes(ctx.root)
    if isinstance(rows, str):
        return run, f"table {rows}"
    kept = [h for h in FAKE_HASHES if rows.count(h) == 1]
    odd = sorted(set(rows) - {*FAKE_HASHES, *(p.stem for p in records(ctx.root))})
    verdict = "kept" if len(kept) == 2 and not odd else "CHANGED"
    return run, f"{verdict}: {len(kept)}/2 numeric hashes once, {len(rows)} rows, odd {odd[:2]}"


def add_fake_points(root: Path, rec: Path) -> None:
    """Turn the one finished point into two whose hashes look like numbers (record + table row
    each), so that no hash in the table looks like text."""
    record = json.loads(rec.read_text())
    with open(root / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    for key in FAKE_HASHES:
        (root / "records" / f"{key}.json").write_text(json.dumps({**record, "config_hash": key}))
    rec.unlink()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(row), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "config_hash": key} for key in FAKE_HASHES)
    (root / "results.csv").write_text(buf.getvalue())


@case("resume=false recomputes a recorded point", hint="resume")
def resume_false(ctx: Ctx):
    first, rec = first_point(ctx)
    if rec is None:
        return first, "first run failed"
    os.utime(rec, ns=(0, 0))
    run = ctx.run("resume=false")
    redone = "recomputed" if rec.stat().st_mtime_ns != 0 else "NOT recomputed"
    return run, f"{redone}, {survival(ctx.root, 1)}" if run.code == 0 else None


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "cut":
        path.write_bytes(data[: len(data) - 7])
    elif how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(random.Random(0).randbytes(max(len(data), 64)))


def damaged_table(how: str):
    def body(ctx: Ctx):
        first, rec = first_point(ctx, "method.ratio=0.25")
        if rec is None:
            return first, "first run failed"
        damage(ctx.root / "results.csv", how)
        run = ctx.run("method.ratio=0.5")
        return run, survival(ctx.root, 2)

    return body


for _how, _what in (("cut", "cut mid-row"), ("empty", "emptied"), ("random", "random bytes")):
    CASES.append(
        Case(f"results.csv {_what}, then the next point", damaged_table(_how), "csv", True)
    )


@case("truncated record json, then the same point again", hint="record", warn=True)
def truncated_record(ctx: Ctx):
    first, rec = first_point(ctx)
    if rec is None:
        return first, "first run failed"
    damage(rec, "half")
    run = ctx.run()
    try:
        whole = "record whole again" if json.loads(rec.read_text()) else "empty record"
    except (OSError, ValueError):
        whole = "record STILL damaged"
    return run, f"{whole}, {survival(ctx.root, 1)}"


@case("two runs started in the same second (clock frozen): their run dirs")
def same_second(ctx: Ctx):
    site = ctx.root / "frozen_clock"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FROZEN_TIME)
    first = ctx.run(pythonpath=str(site))
    run = ctx.run("method.ratio=0.5", pythonpath=str(site))
    dirs = run_dirs(ctx.root)
    verdict = "distinct" if len(dirs) == 2 else "SHARED"
    if first.code or run.code:
        verdict = f"runs FAILED ({judge(run, message(run.out))})"
    names = sorted(d.name for d in dirs)
    return run, f"{verdict}: {len(dirs)} run dir(s) for 2 runs {names}"


@case("multirun method.ratio=0.25,0.05,0.5: the bad middle point", hint="sweep job")
def sweep_bad_point(ctx: Ctx):
    run = ctx.run("method.ratio=0.25,0.05,0.5", multirun=True)
    summary = "summary" if "sweep job(s) failed" in run.out else "no summary"
    layers = sorted(json.loads(p.read_text()).get("layers_after") for p in records(ctx.root))
    return run, f"{summary}, layers_after of records {layers} (want [2, 3])"


@case("sweep of 3 points SIGKILLed after the first record, then rerun")
def killed_sweep(ctx: Ctx):
    args = ctx.args(["method.ratio=0.25,0.5,0.75", "eval.limit=20"], multirun=True)
    proc = subprocess.Popen(args, cwd=ctx.repo, env=ctx.env(None, None), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + ctx.timeout
    while time.time() < deadline and not records(ctx.root) and proc.poll() is None:
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in records(ctx.root)}
    run = ctx.run("method.ratio=0.25,0.5,0.75", "eval.limit=20", multirun=True)
    redone = sum((ctx.root / "records" / n).stat().st_mtime_ns != t for n, t in before.items())
    return run, f"{len(before)} before kill, {redone} recomputed; {survival(ctx.root, 3)}"


bad("eval.limit=-1", "eval.limit=-1")
bad("eval.limit=abc", "eval.limit=abc")
bad("eval.limit=1.5", "eval.limit=1.5")
bad("eval.batch_size=0", "eval.batch_size=0")
bad("eval.batch_size=big", "eval.batch_size=big")
bad("eval.tasks=[nosuchtask]", "eval.tasks=[nosuchtask]", hint="nosuchtask")
bad("eval.tasks=piqa (a string)", "eval.tasks=piqa")
bad("eval.num_fewshot={mmlu:5} on the default eval profile (should run)", "eval=quick",
    "eval.num_fewshot={mmlu:5}", hint="mmlu")  # fmt: skip
bad("eval.num_fewshot={piqa:1} (the mirror has no piqa train split)", "eval.num_fewshot={piqa:1}")
bad("logger=wandb logger.mode=bogus", "logger=wandb", "logger.mode=bogus")


@case("wandb online at a closed loopback port (WANDB_BASE_URL=http://127.0.0.1:9)", "wandb", True)
def wandb_closed_port(ctx: Ctx):
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40,
           "WANDB_SILENT": "true", "WANDB_DIR": str(ctx.root)}  # fmt: skip
    run = ctx.run("logger=wandb", "logger.mode=online", env=env)
    return run, f"{survival(ctx.root, 1)} in {run.seconds:.1f} s" if run.code == 0 else None


@case("paths.output_root under a regular file", hint="a_file")
def output_root_under_file(ctx: Ctx):
    (ctx.root / "a_file").write_text("not a directory")
    return ctx.run(f"paths.output_root={ctx.root / 'a_file' / 'out'}"), None


@case("paths.records_dir under a regular file", hint="records_dir")
def records_under_file(ctx: Ctx):
    (ctx.root / "a_file").write_text("not a directory")
    return ctx.run(f"paths.records_dir={ctx.root / 'a_file' / 'records'}"), None


bad("calib.max_length=0", "calib.max_length=0")
bad("calib.batch_size=0", "calib.batch_size=0")
bad("calib.per_subject=0", "calib.per_subject=0")
bad("calib.split=train", "calib.split=train")
bad("calib=text with no path", "calib=text", hint="calib.path")
bad("calib=text calib.path=/no/such/calib.jsonl", "calib=text", "calib.path=/no/such/calib.jsonl")


@case("calib=text calib.num_samples=0 (a real text file)", hint="num_samples")
def calib_no_samples(ctx: Ctx):
    text = ctx.root / "calib.txt"
    text.write_text("".join(f"calibration sample number {i} of the text\n" for i in range(20)))
    return ctx.run("calib=text", f"calib.path={text}", "calib.num_samples=0"), None


bad("curve=[]", "curve=[]")
bad("curve=[0.25,1.5]", "curve=[0.25,1.5]")
bad("curve=[0.25,abc]", "curve=[0.25,abc]")
bad("method.ratio=abc", "method.ratio=abc")
bad("method.ratio=1.0", "method.ratio=1.0")
bad("method.ratio=0", "method.ratio=0")
bad("method.ratio=null method.num_layers=two", "method.ratio=null", "method.num_layers=two")
bad("method=nosuch (close match?)", "method=nosuch", hint="nosuch")
bad("model=nosuch", "model=nosuch", hint="nosuch")
bad("model.device=cuda (no CUDA here)", "model.device=cuda")
bad("model.dtype=bogus", "model.dtype=bogus")
bad("data_root=/no/such/mirror", "data_root=/no/such/mirror", hint="data_root")


def mirror(ctx: Ctx, rows: int | None) -> Path:
    """A temporary data_root: MMLU linked from the real mirror, piqa's validation file copied
    (first 20 rows, line 7 cut off) or, with rows=None, left out."""
    root = ctx.root / "mirror"
    (root / "cais").mkdir(parents=True)
    (root / "cais" / "mmlu").symlink_to(DATA / "cais" / "mmlu")
    if rows is not None:
        src = DATA / "baber" / "piqa" / "default" / "validation.jsonl"
        lines = src.read_text().splitlines()[:20]
        lines[rows - 1] = lines[rows - 1][:25]
        bad_file = root / "baber" / "piqa" / "default" / "validation.jsonl"
        bad_file.parent.mkdir(parents=True)
        bad_file.write_text("\n".join(lines) + "\n")
    return root


@case("corrupt line 7 of the piqa jsonl (temp mirror)", hint="validation.jsonl:7")
def corrupt_jsonl(ctx: Ctx):
    run = ctx.run(f"data_root={mirror(ctx, 7)}")
    named = "names file:line" if "validation.jsonl:7" in run.out else "file:line NOT named"
    return run, f"{judge(run, message(run.out, 'jsonl'))}; {named}"


@case("missing benchmark file (mirror without piqa)", hint="piqa")
def missing_benchmark(ctx: Ctx):
    return ctx.run(f"data_root={mirror(ctx, None)}"), None


bad("quant=nosuch", "quant=nosuch", hint="nosuch")
bad("repair=linear method=none", "repair=linear", "method=none", hint="repair")
bad("laco with m >= layers (method.m=4 of 4)", "method=laco", "method.m=4", hint="method.m")
bad("sleb asking for 5 of 4 layers", "method=sleb", "method.ratio=null", "method.num_layers=5")
bad("seed=abc", "seed=abc")


def damaged_cache(pattern: str, how: str, drop: str = ""):
    """MKA with a cache dir: run, damage the cache files (delete those matching `drop`, so the
    damaged ones are read), run a new point on the same cache (another eval.limit: another
    config hash, the same activations)."""

    def body(ctx: Ctx):
        over = ["method=mka", f"method.cache={ctx.root / 'mka_cache'}", "method.max_points=128"]
        first = ctx.run(*over)
        files = sorted((ctx.root / "mka_cache").glob(pattern))
        if first.code != 0 or not files:
            return first, f"first run exit {first.code}, {len(files)} {pattern} file(s)"
        for path in files:
            damage(path, how)
        for path in (ctx.root / "mka_cache").glob(drop) if drop else ():
            path.unlink()
        run = ctx.run(*over, "eval.limit=3")
        named = sum(str(p) in run.out for p in files)
        return run, f"{len(files)} damaged, {named} named in a warning; {survival(ctx.root, 2)}"

    return body


HIDDEN = "truncated activation cache (hidden_*.pt; npib_*.pt deleted), rerun"
CASES.append(Case(HIDDEN, damaged_cache("hidden_*.pt", "half", "npib_*.pt"), "hidden_", True))
NPIB = "garbage npib_*.pt similarity cache, rerun"
CASES.append(Case(NPIB, damaged_cache("npib_*.pt", "random"), "npib_", True))


@case("damaged failures/<hash>.json marker, then the point", hint="failures", warn=True)
def damaged_failure(ctx: Ctx):
    first, rec = first_point(ctx)
    if rec is None:
        return first, "first run failed"
    marker = ctx.root / "failures" / rec.name
    marker.parent.mkdir(exist_ok=True)
    marker.write_text('{"error": "ValueError: bad", "conf')
    rec.unlink()
    run = ctx.run()
    left = "marker left" if marker.exists() else "marker gone"
    return run, f"{left}, {survival(ctx.root, 1)}" if run.code == 0 else left


@case("file modes under umask 022 (want 0644)")
def file_modes(ctx: Ctx):
    run = ctx.run(umask=0o022)
    files = [*records(ctx.root), ctx.root / "results.csv", *ctx.root.glob("runs/*/*/results.json")]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if p.exists()}
    odd = {k: v for k, v in modes.items() if v != "0o644"}
    return run, f"{len(modes)} files 0644" if not odd else f"NOT 0644: {odd}"


@case("skipped run (already recorded) leaves results.json in its run dir", hint="already")
def skipped_run(ctx: Ctx):
    first = ctx.run()
    if first.code != 0:
        return first, "first run failed"
    old = run_dirs(ctx.root)
    run = ctx.run()
    new = sorted(run_dirs(ctx.root) - old)
    have = [d for d in new if (d / "results.json").exists()]
    return run, f"{len(have)}/{len(new)} new run dir(s) with results.json"


@case("missing benchmark split file (piqa folder holds only train.jsonl)", hint="validation")
def missing_split(ctx: Ctx):
    root = mirror(ctx, None)
    folder = root / "baber" / "piqa" / "default"
    folder.mkdir(parents=True)
    src = DATA / "baber" / "piqa" / "default" / "validation.jsonl"
    (folder / "train.jsonl").write_text("\n".join(src.read_text().splitlines()[:5]) + "\n")
    return ctx.run(f"data_root={root}"), None


# --- issue 31: paths, one hash per experiment, signals, a full disk, shared work ----------

# Root writes anywhere; without these capabilities it obeys file modes like any user.
AS_USER = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()


@case("records/ replaced by a file", hint="records")
def records_is_file(ctx: Ctx):
    (ctx.root / "records").write_text("not a folder")
    run = ctx.run()
    table = (ctx.root / "results.csv").read_text() if (ctx.root / "results.csv").is_file() else ""
    return run, f"{judge(run, message(run.out, 'records'))}; table {table.count(chr(10))} line(s)"


@case("results.csv replaced by a directory", hint="results.csv")
def table_is_dir(ctx: Ctx):
    (ctx.root / "results.csv").mkdir()
    return ctx.run(), None


def other_users_root(ctx: Ctx, entry: str) -> None:
    """A group-writable root that another user filled under umask 022: `entry` is theirs."""
    first = ctx.run(umask=0o022)  # the first user's run
    if first.code != 0:
        raise RuntimeError("first run failed")
    ctx.root.chmod(0o777)
    path = ctx.root / entry
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chown(item, 65534, 65534) if os.geteuid() == 0 else item.chmod(
            item.stat().st_mode & ~0o222
        )


@case("second user, root filled under umask 022: runs/ not theirs", hint="runs")
def other_user_runs(ctx: Ctx):
    other_users_root(ctx, "runs")
    return ctx.run("method.ratio=0.5", prefix=AS_USER), None


@case("second user, root filled under umask 022: results.csv.lock not theirs", hint="lock")
def other_user_lock(ctx: Ctx):
    other_users_root(ctx, "results.csv.lock")
    return ctx.run("method.ratio=0.5", prefix=AS_USER), None


@case("second user, root filled under umask 022: records/ not theirs", hint="records")
def other_user_records(ctx: Ctx):
    other_users_root(ctx, "records")
    return ctx.run("method.ratio=0.5", prefix=AS_USER), None


bad("+foo=bar (a key nothing reads)", "+foo=bar", hint="foo")
bad("method.ratoi=0.25 (misspelt, no +)", "method.ratoi=0.25", hint="ratoi")
bad("+method.ratoi=0.25 (misspelt, added)", "+method.ratoi=0.25", hint="ratoi")


@case("eval.tasks=[piqa,piqa] after eval.tasks=[piqa]: one experiment", hint="piqa", warn=True)
def duplicate_tasks(ctx: Ctx):
    first, rec = first_point(ctx)
    if rec is None:
        return first, "first run failed"
    run = ctx.run("eval.tasks=[piqa,piqa]")
    skipped = "skipped (already recorded)" if "already recorded" in run.out else "COMPUTED AGAIN"
    return run, f"{skipped}, {len(records(ctx.root))} record(s)"


def signal_curve(sig: signal.Signals):
    def body(ctx: Ctx):
        args = ctx.args(["curve=[0.25,0.5,0.75]", "eval.limit=40"], multirun=False)
        log = ctx.root / "out.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(args, cwd=ctx.repo, env=ctx.env(None, None), stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            start = time.monotonic()
            while not records(ctx.root) and proc.poll() is None:
                if time.monotonic() - start > ctx.timeout:
                    break
                time.sleep(0.2)
            proc.send_signal(sig)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        run = Run(proc.returncode, time.monotonic() - start, log.read_text(errors="replace"))
        again = ctx.run("curve=[0.25,0.5,0.75]", "eval.limit=40")
        lines = len(run.out.splitlines())
        return run, f"{judge(run, message(run.out))}, {lines} output lines; rerun: " + (
            survival(ctx.root, 3) if again.code == 0 else f"FAILED {again.code}"
        )

    return body


CASES.append(Case("SIGTERM to a curve after its first point", signal_curve(signal.SIGTERM), "SIG"))
CASES.append(Case("SIGINT to a curve after its first point", signal_curve(signal.SIGINT), "SIG"))


@contextlib.contextmanager
def small_disk(ctx: Ctx, size: str = "16m"):
    """A tmpfs of `size` as the output root (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("needs root to mount a tmpfs")
    disk = ctx.root / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_after_first_record(ctx: Ctx, disk: Path, extra: list[str], multirun: bool) -> Run:
    """Start the run on `disk`, fill the disk when its first record appears, wait for the end."""
    args = ctx.args([*extra, f"paths.output_root={disk}"], multirun=multirun)
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=ctx.repo, env=ctx.env(None, None), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
    while not records(disk) and proc.poll() is None and time.monotonic() - start < ctx.timeout:
        time.sleep(0.2)
    with open(disk / "filler", "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 2**20)
    out, _ = proc.communicate(timeout=ctx.timeout)
    return Run(proc.returncode, time.monotonic() - start, out)


@case("full disk (tmpfs filled) in the middle of a curve", hint="space")
def full_disk_curve(ctx: Ctx):
    with small_disk(ctx) as disk:
        run = fill_after_first_record(ctx, disk, ["curve=[0.25,0.5,0.75]", "eval.limit=40"], False)
        found = f"{len(records(disk))} record(s) kept"
    tracebacks = run.out.count("Traceback")
    return run, f"{judge(run, message(run.out, 'space'))}, {tracebacks} traceback(s), {found}"


@case("full disk (tmpfs filled) during a -m sweep of 3", hint="sweep")
def full_disk_sweep(ctx: Ctx):
    with small_disk(ctx) as disk:
        run = fill_after_first_record(ctx, disk, ["method.ratio=0.25,0.5,0.75", "eval.limit=40"],
                                      True)  # fmt: skip
    stopped = "sweep job(s) failed" in run.out or "sweep stopped" in run.out
    summary = "summary" if stopped else "no summary"
    return run, f"{summary}, {run.out.count('Traceback')} traceback(s)"


@case("20 KB free on the output root", hint="free")
def nearly_full(ctx: Ctx):
    with small_disk(ctx) as disk:
        with open(disk / "filler", "wb") as fh, contextlib.suppress(OSError):
            fh.write(b"\0" * (16 * 2**20 - 20 * 1024))
        run = ctx.run(f"paths.output_root={disk}")
    return run, None


def sweep_args(ctx: Ctx, ratios: str) -> list[str]:
    return ctx.args([f"method.ratio={ratios}", "eval.limit=20"], multirun=True)


@case("two overlapping -m sweeps started together (same 3 points, opposite orders)")
def overlapping_sweeps(ctx: Ctx):
    start = time.monotonic()
    procs = [
        subprocess.Popen(sweep_args(ctx, order), cwd=ctx.repo, env=ctx.env(None, None),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for order in ("0.25,0.5,0.75", "0.75,0.5,0.25")
    ]  # fmt: skip
    outs = [p.communicate(timeout=ctx.timeout)[0] for p in procs]
    computed = sum(out.count("piqa/acc_norm") for out in outs)
    run = Run(max(p.returncode for p in procs), time.monotonic() - start, "\n".join(outs))
    return run, f"{computed} point computations for 3 points; {survival(ctx.root, 3)}"


@case("sweep SIGKILLed holding a claim, rerun at once: the claim", hint="claim", warn=True)
def killed_claim(ctx: Ctx):
    proc = subprocess.Popen(sweep_args(ctx, "0.25,0.5,0.75"), cwd=ctx.repo,
                            env=ctx.env(None, None), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + ctx.timeout
    claims = ctx.root / "claims"
    while time.time() < deadline and proc.poll() is None:  # kill while the 2nd point is claimed
        if records(ctx.root) and list(claims.glob("*.json")):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):  # no claims: the sweep ran to its end
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = len(list((ctx.root / "claims").glob("*.json")))
    run = ctx.run("method.ratio=0.25,0.5,0.75", "eval.limit=20", multirun=True)
    return run, f"{left} claim(s) left by the kill; rerun: {survival(ctx.root, 3)}"


# --- issue 31, verified inputs (cases 72 on): model source, amounts, bounds, data, report ---
bad("model.name_or_path=/etc with the default model (its wheel)", "model=smollm2_135m",
    "model.name_or_path=/etc", hint="name_or_path")  # fmt: skip
bad("model.name_or_path=/etc model.pip_package=null: not a model folder", "model=smollm2_135m",
    "model.name_or_path=/etc", "model.pip_package=null", "model.gguf_file=null",
    hint="/etc")  # fmt: skip
bad("laco method.m=4 of 4 layers", "method=laco", "method.m=4", hint="method.m")
bad("sleb method.num_layers=5 of 4 layers", "method=sleb", "method.num_layers=5", hint="num_layers")
bad("paths.output_root=/tmp/outé unquoted (non-ASCII)", "paths.output_root=/tmp/outé", hint="é")


@case("method.num_layers=1 alone (the yaml sets a ratio)", hint="num_layers")
def num_layers_alone(ctx: Ctx):
    run = ctx.run("method.num_layers=1")
    if run.code != 0:
        return run, None
    (rec,) = records(ctx.root)
    method = json.loads(rec.read_text())["config"]["method"]
    return (
        run,
        f"ran; record has ratio={method.get('ratio')}, num_layers={method.get('num_layers')}",
    )


def linked_mirror(ctx: Ctx, name: str, rows: int | None) -> Path:
    """A data_root whose piqa folder is a link: to the real data, or to a 20-row copy."""
    root, target = ctx.root / name, DATA / "baber" / "piqa"
    if rows is not None:
        target = ctx.root / f"{name}_piqa"
        src = DATA / "baber" / "piqa" / "default" / "validation.jsonl"
        (target / "default").mkdir(parents=True)
        head = src.read_text().splitlines()[:rows]
        (target / "default" / "validation.jsonl").write_text("\n".join(head) + "\n")
    (root / "baber").mkdir(parents=True)
    (root / "baber" / "piqa").symlink_to(target, target_is_directory=True)
    (root / "cais").symlink_to(DATA / "cais", target_is_directory=True)  # calibration's MMLU
    return root


@case("two mirrors whose piqa folders are links (20 rows vs full): two experiments")
def linked_mirrors(ctx: Ctx):
    first = ctx.run(f"data_root={linked_mirror(ctx, 'small', 20)}")
    if first.code != 0:
        return first, "first run failed"
    run = ctx.run(f"data_root={linked_mirror(ctx, 'full', None)}")
    skipped = "SKIPPED as already recorded" if "already recorded" in run.out else "computed"
    return run, f"second mirror {skipped}; {len(records(ctx.root))} record(s)"


@case("report over a root with a damaged record: read-only", hint="damaged")
def report_read_only(ctx: Ctx):
    first, rec = first_point(ctx)
    if rec is None or ctx.run("method.ratio=0.5").code != 0:
        return first, "first runs failed"
    rec.write_text("{ not json")  # one of the two records
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mka_exp.report", str(ctx.root), "--out",
                           str(ctx.root / "report")], cwd=ctx.repo, env=ctx.env(None, None),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    run = Run(done.returncode, time.monotonic() - start, done.stdout)
    moved = list((ctx.root / "records").glob("*.damaged"))
    return run, f"record {'MOVED aside' if moved or not rec.exists() else 'left in place'}"


SAVE_TINY = (
    "import sys; from mka_exp.models import toy; "
    "lm = toy.build_random_model('llama', num_layers=4, hidden_size=64, device='cpu'); "
    "lm.model.save_pretrained(sys.argv[1]); lm.tokenizer.save_pretrained(sys.argv[1])"
)


@case("local model folder: model.safetensors changed in place (finite values) after a first run",
      hint="model.safetensors")  # fmt: skip
def changed_local_folder(ctx: Ctx):
    """The tiny model saved as a folder and run once; then 16 KB of its weights set to 0.5 (no
    NaN: the finite check cannot see it) and another point run on it."""
    import struct

    folder = ctx.root / "model"
    subprocess.run([sys.executable, "-c", SAVE_TINY, str(folder)], cwd=ctx.repo, check=True,
                   env=ctx.env(None, None), capture_output=True)  # fmt: skip
    model = ["model=llama3_8b", f"model.name_or_path={folder}"]
    env = {"MKA_EXP_CACHE": str(ctx.root / "cache")}  # the folder's seals: not in ~/.cache
    first = ctx.run(*model, env=env)
    if first.code != 0:
        return first, "first run failed"
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2 // 4 * 4)
        f.write(struct.pack("<f", 0.5) * 4096)
    run = ctx.run(*model, "method.ratio=0.5", env=env)
    if run.code == 0:
        return run, f"RAN on the changed weights: {len(records(ctx.root))} records"
    return run, None


# --- driver -------------------------------------------------------------------------------


def run_case(number: int, item: Case, repo: Path, timeout: float) -> list[str]:
    """The cells of one case run against `repo`: exit code, seconds, line, outcome."""
    root = Path(tempfile.mkdtemp(prefix=f"battery{number:02d}_"))
    base = {
        "model": "tiny_llama", "logger": "none", "method": "reverse_prune",
        "eval.tasks": "[piqa]", "eval.limit": "2", "calib.max_length": "32",
        "data_root": str(DATA), "paths.output_root": str(root),
    }  # fmt: skip
    try:
        run, outcome = item.body(Ctx(repo, root, timeout, base))
    except Exception as err:  # noqa: BLE001 (the battery itself must go on)
        run, outcome = Run(None, 0.0, ""), f"battery error: {type(err).__name__}: {err}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = message(run.out, item.hint, item.warn)
    outcome = outcome or judge(run, text)
    return [str(run.code), f"{run.seconds:.1f}", text, outcome]


def row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="checkout whose run.py runs")
    parser.add_argument("--before", type=Path, help="an older checkout: before/after columns")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--only", type=int, nargs="+", help="case numbers (1-based)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run.py run")
    opts = parser.parse_args()
    repo = opts.repo.resolve()
    if opts.before:
        lines = [f"Fault battery: before = {opts.before.resolve()}, after = {repo}", "",
                 BEFORE_AFTER, "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    else:
        lines = [f"Fault battery against {repo}", "", HEADER, "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for number, item in enumerate(CASES, 1):
        if opts.only and number not in opts.only:
            continue
        after = run_case(number, item, repo, opts.timeout)
        if opts.before:
            before = run_case(number, item, opts.before.resolve(), opts.timeout)
            cells = [before[0], before[2], before[3], after[0], after[2], after[3]]
            lines.append(row([str(number), item.name, *cells]))
        else:
            lines.append(row([str(number), item.name, *after]))
        print(lines[-1], flush=True)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
