"""Files that survive a crash and a full disk: every write goes to a temporary file first and is
moved into place with `os.replace` (a crash leaves the old file or the new one, never half of
one); a full disk or quota becomes `DiskFull` naming the path and the free space; writers of one
table share an exclusive `flock` (which works on NFS/Lustre where SQLite locking does not).

Files are created with the process umask (0644 under the usual 022), so a group sharing an
output root can read them. The checks that a folder can take a run's files (writable, the
records dir's layout, free space) live here too, and run with the other config checks before any
model loads. Imports nothing of `mka_exp`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or this user's quota on it


class DiskFull(OSError):
    """A write found the disk (or the quota) full; the message names the path and free space."""

    def __str__(self) -> str:
        return str(self.strerror)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def free_space(path: Path) -> str:
    """Free bytes on the file system holding `path` (its first existing folder), for a message."""
    path = Path(path).absolute()
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
    try:
        return f"{human_bytes(shutil.disk_usage(folder).free)} free on {folder}"
    except OSError:
        return f"free space of {folder} unknown"


@contextlib.contextmanager
def naming_full_disk(path: Path) -> Iterator[None]:
    """A full disk while writing `path` becomes `DiskFull` naming the path and the free space
    (`OSError: [Errno 28]` often names no file at all)."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno not in FULL:
            raise
        problem = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
        where = err.filename or path  # the file the system call named, else the one being written
        raise DiskFull(err.errno, f"{problem} writing {where} ({free_space(where)})") from None


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[str]:
    """A temporary path beside `path`, moved onto it only if the block succeeds.

    The file is created with mode 0666 minus the umask (not mkstemp's 0600), so the result has
    the permissions any other file of this process would have."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with naming_full_disk(path):
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            yield str(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_target(Path(path)) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())


def write_bytes_atomic(path: Path, blob: bytes) -> None:
    with atomic_target(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process writing the same table."""
    lock = path.with_suffix(path.suffix + ".lock")
    with naming_full_disk(lock):
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "w")  # noqa: SIM115 (closed below, after the lock is released)
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- checks that a folder can take a run's files (run before anything is computed) ----------


def check_writable_dir(key: str, path: str) -> None:
    """`path` is, or can be made, a directory this process writes into (nothing is created)."""
    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"{key}={str(path)!r}: {existing} is a file, not a directory; "
            "allowed: a directory you can write to"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={str(path)!r}: {existing} {not_writable(existing)}")


# What a records dir holds (records.py, table.py): each entry's kind and whether this user must be able to
# write the entry itself. The table and the records are replaced (written beside, then moved), so
# only their folder must be writable; the lock file is opened for writing by every writer.
RECORDS_LAYOUT = {
    "records": ("dir", True),
    "failures": ("dir", True),
    "claims": ("dir", True),
    "results.csv": ("file", False),
    "results.csv.lock": ("file", True),
}


def not_writable(path: Path) -> str:
    """Why `path` cannot be written, with its owner and mode (a shared root under umask 022)."""
    info = path.stat()
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = f"uid {info.st_uid}"
    return (
        f"is not writable for this user (owner {owner}, mode {info.st_mode & 0o7777:04o}); "
        "allowed: a path you can write to (on a shared root: chmod -R g+w by its owner, and umask "
        "002 for every user)"
    )


def check_records_dir(key: str, path: str) -> None:
    """The records dir and what it holds are what they should be (dir vs file) and writable."""
    check_writable_dir(key, path)
    root = Path(path).expanduser().absolute()
    for name, (kind, write) in RECORDS_LAYOUT.items():
        entry = root / name
        if not entry.exists() and not entry.is_symlink():
            continue
        if entry.is_dir() != (kind == "dir"):
            other = "directory" if entry.is_dir() else "file"
            raise ValueError(
                f"{key}={str(path)!r}: {entry} is a {other}, not a {kind}; "
                f"allowed: a records dir whose {name} is a {kind} (move the {other} away)"
            )
        mode = os.W_OK | (os.X_OK if kind == "dir" else 0)
        if write and not os.access(entry, mode):
            raise ValueError(f"{key}={str(path)!r}: {entry} {not_writable(entry)}")
    check_free_space(key, path)


MIN_FREE_BYTES = 10 * 2**20  # a point's record, per-example file, figures and temporaries


def check_free_space(key: str, path: str) -> None:
    """Room for a point's files: a run on a full disk would compute everything, then fail."""
    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise ValueError(
            f"{key}={str(path)!r}: only {free / 2**20:.2f} MB free on {existing}; allowed: a file "
            f"system with at least {MIN_FREE_BYTES // 2**20} MB free (free some space first)"
        )
