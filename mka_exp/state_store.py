"""The reuse cache's store: hidden states on disk, one file per entry, content-addressed.

Why files and not a database: Slurm sweeps share one cache dir over a network file system, and
an entry written once is only ever read or dropped. Each file is written to a temporary name and
moved into place (`os.replace`), so a reader sees a whole entry or none, and two writers of one
entry (identical content) never corrupt it. A file carries its key and a checksum of its payload:
a damaged, truncated or foreign file is reported as missing (and recomputed), never used.

The store is bounded in bytes: a reader touches what it uses (mtime), and a writer that passes
the bound drops the least recently used files until it is under 90 % of it. An entry larger than
the bound is not written. Each writer counts its own writes since its last scan of the directory,
so with several writers the bound holds at each writer's next eviction.

May import: torch, `checks`. Floor 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mka_exp.checks import check_positive, gather, is_int

log = logging.getLogger(__name__)

MAGIC = b"MKA-REUSE 1\n"
EVICT_TO = 0.9  # of the bound, so that eviction (a scan of the directory) is not on every write
STALE_TMP_S = 3600  # a temporary file older than this was left by a writer that died


def check_settings(prefix: str, where: Any, layers: Any, max_bytes: Any, *more) -> None:
    """A stage's store settings (`eval.reuse*`, `repair.reuse*`), every problem at once: the
    store off (null/false) or a directory; the kept layers every n-th (an int >= 1) or listed
    (ints >= 1); the bound in bytes; `more`: the stage's own checks."""

    def directory() -> None:
        if where is not None and where is not False and not (isinstance(where, str) and where):
            raise ValueError(
                f"{prefix}.reuse={where!r}: allowed null/false (off) or a store directory, "
                "e.g. ${paths.cache_dir}/reuse"
            )

    def which() -> None:
        # a list or Hydra's ListConfig (a Sequence too)
        listed = isinstance(layers, Sequence) and not isinstance(layers, str) and len(layers)
        if not (is_int(layers) and layers >= 1) and not (
            listed and all(is_int(i) and i >= 1 for i in layers)
        ):
            raise ValueError(f"{prefix}.reuse_layers={layers!r}: allowed an integer >= 1 (every "
                             "n-th layer) or a non-empty list of layer indices >= 1")  # fmt: skip

    gather(directory, which, lambda: check_positive(f"{prefix}.reuse_bytes", max_bytes), *more)


@dataclass(frozen=True)
class Key:
    """What produced a hidden state: the fingerprint of the embedding and layers below `layer`
    (with the config, dtype and device kind), the token path it belongs to, and the layer."""

    fingerprint: str
    tokens: str
    layer: int

    def name(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()


def payload_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def checksum(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


class Store:
    """Entries under `root`, at most `max_bytes` in all (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self.used = sum(size for _, size, _ in self.files())
        self.written = 0  # bytes this process wrote (stats)

    def path(self, key: Key) -> Path:
        name = key.name()
        return self.root / name[:2] / f"{name}.bin"

    def has(self, key: Key) -> bool:
        return self.path(key).is_file()

    def get(self, key: Key) -> torch.Tensor | None:
        """The entry's tensor, or None when it is missing, damaged or another key's."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        tensor = decode(data, key)
        if tensor is None:
            log.warning("reuse store: %s is damaged or foreign; recomputing it", path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        return tensor

    def put(self, key: Key, tensor: torch.Tensor) -> int:
        """Write the entry unless it is there or larger than the bound; the bytes written."""
        path = self.path(key)
        if path.is_file():
            return 0
        data = encode(key, tensor)
        if len(data) > self.max_bytes:
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as err:  # disk full, a vanished directory: the run goes on uncached
            log.warning("reuse store: cannot write %s (%s)", path, err)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return 0
        self.used += len(data)
        self.written += len(data)
        if self.used > self.max_bytes:
            self.evict()
        return len(data)

    def files(self) -> list[tuple[Path, int, float]]:
        """(path, size, mtime) of every entry; stale temporary files are removed on the way."""
        found = []
        for path in self.root.glob("*/*"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                if ".tmp." in path.name:
                    if time.time() - stat.st_mtime > STALE_TMP_S:
                        path.unlink()
                    continue
                found.append((path, stat.st_size, stat.st_mtime))
        return found

    def evict(self) -> None:
        """Drop least recently used entries until the store is under EVICT_TO of its bound."""
        found = sorted(self.files(), key=lambda entry: entry[2])
        self.used = sum(size for _, size, _ in found)
        for path, size, _ in found:
            if self.used <= EVICT_TO * self.max_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
            self.used -= size


def encode(key: Key, tensor: torch.Tensor) -> bytes:
    payload = payload_bytes(tensor)
    header = {
        "key": asdict(key),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "bytes": len(payload),
        "blake2b": checksum(payload),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode(data: bytes, key: Key) -> torch.Tensor | None:
    """The tensor of a file written by `encode` for `key`; None for anything else."""
    if not data.startswith(MAGIC):
        return None
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC) : end])
        dtype = getattr(torch, header["dtype"])
        payload = memoryview(data)[end + 1 :]
        if header["key"] != asdict(key) or len(payload) != header["bytes"]:
            return None
        if checksum(payload) != header["blake2b"]:
            return None
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return flat.view(dtype).reshape(header["shape"])
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None
