"""Answers kept as they come (`eval.answer_cache`): every request a model answers is written at
once to a per-model SQLite file by lm-eval's own `CachingLM`, so an evaluation killed after an
hour resumes where it stopped, and a model identical to one evaluated before costs nothing.

Why: one 1,140-question MMLU evaluation of a 1.5B model is an hour on one CPU core; a session
limit, a Slurm preemption or a kill -9 used to throw that hour away, because the run record is
written only when the evaluation ends.

Exactness: lm-eval's cache keys an answer by its request alone (context and continuation), so
the file is named by `answer_key`: a digest of everything else that shapes an answer — every
parameter and buffer of the model with its name, dtype and module type, its config, device kind,
the tokenizer (its full serialization), the backend's scoring settings, the library versions and
the source of the modules that score (a fix there starts a new file). A different model, or the
same model under changed scoring code, never reads another's answers. Answers read back equal the
ones written; a resumed run's remaining requests batch differently, which on some kernels moves a
log-likelihood in its last bits, as any change of batch size does.

    with cached(lm, "/cache/answers", answer_key(model, tokenizer, settings)) as lm:
        evaluator.evaluate(lm, ...)

May import: torch, `fingerprints`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from mka_exp.fingerprints import model_digest

log = logging.getLogger(__name__)

# the modules whose code turns a request into an answer (a change there starts a new file)
SCORING_MODULES = ("hf.py", "vllm.py", "prefix_cache.py", "prefix_tree.py", "reuse.py")
LIBRARIES = ("torch", "transformers", "lm_eval", "vllm")
TABLE = "unnamed"  # SqliteDict's default table, where CachingLM writes


def answer_key(model: Any, tokenizer: Any, settings: dict[str, Any]) -> str:
    """The digest naming a model's answer file (see the module docstring for what it covers)."""
    digest = hashlib.blake2b(digest_size=16)
    parts = {
        "model": model_digest(model),
        "tokenizer": tokenizer_digest(tokenizer),
        "settings": settings,
        "versions": {name: version(name) for name in LIBRARIES},
        "code": scoring_code_digest(),
    }
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A fast tokenizer's whole serialization (vocabulary, merges, normalizer, templates), else
    its vocabulary; with its class, special tokens and sides, which HFLM's encoding reads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = None if backend is not None else sorted(tokenizer.get_vocab().items())
    head = [type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.padding_side,
            tokenizer.truncation_side, getattr(tokenizer, "add_bos_token", None), vocab]  # fmt: skip
    digest = hashlib.blake2b(json.dumps(head, default=str).encode(), digest_size=16)
    digest.update(backend.to_str().encode() if backend is not None else b"")
    return digest.hexdigest()


def scoring_code_digest() -> str:
    digest = hashlib.blake2b(digest_size=16)
    package = resources.files("mka_exp.evaluation")
    for name in SCORING_MODULES:
        digest.update(name.encode() + b"\0" + package.joinpath(name).read_bytes())
    return digest.hexdigest()


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def cached(lm: Any, directory: str, key: str) -> Iterator[Any]:
    """`lm` wrapped in lm-eval's `CachingLM` on `<directory>/<key>.db`. A file SQLite cannot read
    is set aside (`.damaged`) and a new one started: it holds no finished result, only answers
    that are cheaper to keep than to recompute."""
    from lm_eval.api.model import CachingLM

    path = Path(directory) / f"{key}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = readable_count(path)
    log.info("answer cache %s: %d answers from an earlier evaluation of this model", path, kept)
    wrapped = CachingLM(lm, str(path))
    try:
        yield wrapped
    finally:
        wrapped.dbdict.close()


def readable_count(path: Path) -> int:
    """How many answers `path` holds (0 for none); a damaged file is renamed aside first."""
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError(f"quick_check: {check[:3]}")
            tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
            if (TABLE,) not in tables:
                return 0
            return db.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]
    except sqlite3.DatabaseError as err:
        aside = path.with_name(path.name + ".damaged")
        log.warning("answer cache %s is damaged (%s); set aside as %s, starting over",
                    path, err, aside)  # fmt: skip
        path.replace(aside)
        return 0
