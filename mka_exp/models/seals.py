"""The model cache and the seals that tell a cached file is the one written: where fetched and
dequantized files live, each file's size, times and (full and sampled) digests, and the check of
a file, or of a whole float32 copy of a GGUF (or a model folder: `folder_seals`), against them
before every use.

Hashing a multi-GB file on every run costs seconds; a seal lets an unchanged file be trusted after
a sampled read, and a changed or damaged one be named and rebuilt. Imports nothing of `mka_exp`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """Where fetched model files live: $MKA_EXP_CACHE, else ~/.cache/mka_exp."""
    return Path(os.environ.get("MKA_EXP_CACHE", Path.home() / ".cache" / "mka_exp")).expanduser()


COPY_SEALS = ".verified.json"  # in a dequantized copy: the seal of each of its files


def seal_copy(folder: Path) -> None:
    """Seal every file of a dequantized copy (one full hash, when it is written)."""
    names = [p.name for p in sorted(folder.iterdir()) if p.is_file() and p.name != COPY_SEALS]
    seal_files(folder, names, folder / COPY_SEALS)


def copy_problem(folder: Path) -> str | None:
    """Why a dequantized copy is not the one that was written, or None."""
    problems = sealed_problems(folder, folder / COPY_SEALS)
    if problems is None:
        return f"no {COPY_SEALS} with its files' digests (an unfinished or older copy)"
    return next((f"{name}: {problem}" for name, problem in problems.items()), None)


def seal_files(folder: Path, names: list[str], marker: Path) -> None:
    """Seal these files of `folder` in `marker` (one full hash each)."""
    write_json(marker, {"files": {name: seal(folder / name) for name in names}})


def sealed_problems(folder: Path, marker: Path) -> dict[str, str] | None:
    """Each file sealed in `marker` that is no longer the one sealed, with why (None: `marker`
    holds no seals). A file whose metadata alone changed (copied, touched) is hashed in full once
    and, if still the same, sealed again."""
    recorded = read_json(marker)
    files = recorded.get("files")
    if not files:
        return None
    problems, resealed = {}, {}
    for name, sealed in files.items():
        problem, digest = sealed_problem(folder / name, sealed)
        if problem:
            problems[name] = problem
        elif digest:
            resealed[name] = seal(folder / name, digest)
    if resealed:
        with contextlib.suppress(OSError):  # a read-only cache: verified again next time
            write_json(marker, {**recorded, "files": {**files, **resealed}})
    return problems


def discard(folder: Path) -> None:
    """Move a bad copy out of the way (readers holding it keep their files), then delete it."""
    aside = folder.with_name(f"{folder.name}.bad.{os.getpid()}")
    try:
        os.replace(folder, aside)
    except OSError:  # another job moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


SAMPLE_CHUNKS, SAMPLE_BYTES = 32, 1 << 18  # 8 MiB read from a file sealed as unchanged


def sample_digest(path: Path, size: int) -> str:
    """sha256 of SAMPLE_CHUNKS slices spread evenly over the file, its first and last included:
    a cheap look at the content when the metadata says the file did not change."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for index in range(SAMPLE_CHUNKS):
            f.seek(max(0, size - SAMPLE_BYTES) * index // (SAMPLE_CHUNKS - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def seal(path: Path, sha256: str | None = None) -> dict:
    """What a file is: size, mtime and ctime (no user tool sets ctime back), full and sampled
    digests. `sha256` when already known (computed while writing it)."""
    stat = path.stat()
    return {
        "sha256": sha256 or file_sha256(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "sample": sample_digest(path, stat.st_size),
    }


def sealed_problem(path: Path, sealed: dict, pinned: str | None = None) -> tuple:
    """(why `path` is not the file `sealed` (and `pinned`, a sha256) describes, or None; its
    full sha256 when one was computed). Unchanged size, mtime and ctime: the sampled digest is
    compared (milliseconds); otherwise the whole file is hashed."""
    if not path.is_file():
        return "missing", None
    stat = path.stat()
    if sealed.get("size") is not None and stat.st_size != sealed["size"]:
        return f"{stat.st_size:,} bytes where {sealed['size']:,} were expected (truncated?)", None
    expected = (pinned or sealed.get("sha256") or "").lower()
    if not expected:
        return "no digest recorded or pinned", None
    same = all(sealed.get(k) == getattr(stat, f"st_{k}") for k in ("mtime_ns", "ctime_ns"))
    if same and sealed.get("sha256") == expected and sealed.get("sample"):
        if sample_digest(path, stat.st_size) == sealed["sample"]:
            return None, None
        return "its content differs from the recorded one (changed in place)", None
    digest = file_sha256(path)
    if digest != expected:
        return f"sha256 {digest} where {expected} was expected (changed or damaged)", digest
    return None, digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: Path, value: dict) -> None:
    """Atomically: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
