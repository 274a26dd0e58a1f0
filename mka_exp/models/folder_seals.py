"""Seals of a model folder that `from_pretrained` reads: a local folder
(`model.name_or_path=/dir`) or a snapshot in the Hugging Face cache.

A weights file changed or truncated after a first run would otherwise be read silently and its
results recorded under the same config hash. The first load seals every file that can change a
result (`seals.seal`: size, times, full and sampled digests) in a sidecar under
`cache_dir()/folders/`, keyed by the folder's resolved path (the user's folder and the HF cache
are never written to); each later load checks them first (a sampled read when unchanged).
A changed local file is refused in one line: only its owner knows which contents are right
(restore it, or `+model.reseal=true` to seal the new ones). A changed hub file is named and
fetched again at the same commit, whose content is fixed: it must match its seal again.

May import: huggingface_hub, `models.seals`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from pathlib import Path

from mka_exp.models.seals import cache_dir, read_json, seal, sealed_problems, write_json

log = logging.getLogger(__name__)

# What from_pretrained may read that can change a result: weights (and their index), the
# model and generation configs, tokenizer files (vocab, merges, templates), remote code.
SEALED = ("*.safetensors", "*.bin", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")
RESEAL = "+model.reseal=true"


def read_files(folder: Path) -> list[str]:
    """The files of `folder` to seal (hidden ones, such as a copy's own seals, left out)."""
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and any(fnmatch.fnmatch(path.name, pattern) for pattern in SEALED)
    )


def sidecar(folder: Path) -> Path:
    """Where the seals of `folder` live: the project's cache, keyed by its resolved path."""
    resolved = folder.expanduser().resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return cache_dir() / "folders" / f"{resolved.name}-{key}.json"


def seal_folder(folder: Path, names: list[str] | None = None) -> None:
    """Seal `names` (default: every file to seal) of `folder`, keeping the seals of the others.
    A cache that cannot be written is said, and the folder used unsealed (sealed next time)."""
    marker = sidecar(folder)
    kept = read_json(marker).get("files", {}) if names else {}
    try:
        files = {name: seal(folder / name) for name in names or read_files(folder)}
        write_json(marker, {"folder": str(folder.resolve()), "files": {**kept, **files}})
    except OSError as err:
        log.warning("could not record the seals of %s in %s (%s)", folder, marker, err)


def verify_before_load(name_or_path: str, revision: str | None, reseal: bool) -> None:
    """Check the folder `from_pretrained` will read against its seals (sealing it first if it
    has none): a local folder refuses a changed file, a hub snapshot fetches it again."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_local(name_or_path, local, reseal)
    else:
        check_hub(name_or_path, revision)


def seal_after_load(name_or_path: str, revision: str | None) -> None:
    """A hub snapshot grows as files are fetched: seal those `from_pretrained` just fetched."""
    if Path(name_or_path).expanduser().is_dir():
        return
    folder = hub_snapshot(name_or_path, revision)
    if folder is None:
        return
    sealed = read_json(sidecar(folder)).get("files", {})
    new = [name for name in read_files(folder) if name not in sealed]
    if new:
        seal_folder(folder, new)


# --- a local folder ---------------------------------------------------------------------------


def check_local(name_or_path: str, folder: Path, reseal: bool) -> None:
    """A local folder is its sealed self, or one line names the first changed file."""
    marker = sidecar(folder)
    if reseal or not marker.exists():
        seal_folder(folder)
        return
    problems = sealed_problems(folder, marker)
    if problems is None:
        log.warning("the seals of %s in %s are unreadable: sealing it as it is", folder, marker)
        seal_folder(folder)
        return
    sealed = read_json(marker).get("files", {})
    for name in read_files(folder):
        if name not in sealed:
            problems[name] = "not sealed: added since the folder was sealed on first use"
    if problems:
        raise ValueError(refusal(name_or_path, marker, problems, sealed))


def refusal(name_or_path: str, marker: Path, problems: dict, sealed: dict) -> str:
    """One line: the folder, the first changed file, what was sealed and found, what to do."""
    name, problem = next(iter(sorted(problems.items())))
    recorded = sealed.get(name)
    was = f" (sealed: {recorded['size']:,} bytes, sha256 {recorded['sha256']})" if recorded else ""
    more = f"; {len(problems) - 1} more file(s) changed" if len(problems) > 1 else ""
    return (
        f"model.name_or_path={name_or_path!r}: {name}: {problem}{was}{more}; this folder "
        f"is not the one first loaded (seals: {marker}); allowed: restore the file, or "
        f"{RESEAL} to accept the folder's new contents"
    )


# --- a hub snapshot ---------------------------------------------------------------------------


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder a hub id and revision resolve to (None: not cached)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    try:
        repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    except ValueError:  # not a repo id
        return None
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit if commit else None
    return folder if folder is not None and folder.is_dir() else None


def check_hub(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot, each sealed file checked; a changed one is named in one line and
    fetched again at the snapshot's commit, then must match its seal (None: nothing cached)."""
    folder = hub_snapshot(repo_id, revision)
    if folder is None:
        return None
    problems = sealed_problems(folder, sidecar(folder))
    if not problems:
        return folder
    for name, problem in sorted(problems.items()):
        log.warning(
            "hub snapshot %s@%s: %s: %s; fetching it again", repo_id, folder.name, name, problem
        )
    try:
        fetch_again(repo_id, folder.name, sorted(problems))
    except Exception as err:  # noqa: BLE001 (the hub's errors: HTTP, offline, OSError, ...)
        raise ValueError(
            f"model.name_or_path={repo_id!r}: {', '.join(sorted(problems))} changed in the "
            f"cached snapshot {folder} and could not be fetched again ({type(err).__name__}: "
            f"{err}); allowed: fetch it with the hub reachable, or remove the snapshot"
        ) from None
    still = sealed_problems(folder, sidecar(folder))
    if still:
        name, problem = next(iter(sorted(still.items())))
        raise ValueError(
            f"model.name_or_path={repo_id!r}: {name} fetched again at {folder.name} is still "
            f"not the file sealed on first use: {problem}; allowed: remove {folder} (and its "
            f"seals {sidecar(folder)}) to fetch the model afresh"
        )
    return folder


def fetch_again(repo_id: str, commit: str, names: list[str]) -> None:
    """Download these files of the repo at `commit` again, over the cached ones."""
    import huggingface_hub

    huggingface_hub.snapshot_download(
        repo_id, revision=commit, allow_patterns=names, force_download=True
    )
