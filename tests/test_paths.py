"""Every path a run writes is checked before the model loads: the records dir and what it holds
(dir vs file, writable by this user), the run directory's folder and the method's cache. One line
naming the path and what is wrong, no traceback, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mka_exp import pipeline
from mka_exp.results import files
from tests.helpers import REPO_ROOT, compose_config


def writes_anything() -> bool:
    """Root with CAP_DAC_OVERRIDE writes into any folder: the permission cases cannot be simulated
    (run them as a user, or as root without it: `setpriv --bounding-set=-dac_override python -m
    pytest ...`)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o555)
        try:
            return os.access(tmp, os.W_OK)
        finally:
            os.chmod(tmp, 0o755)


ROOT_USER = writes_anything()


def error_of(tmp_path: Path, data_root: Path, *overrides: str) -> str:
    cfg = compose_config(["method=reverse_prune", "eval.tasks=[piqa]", *overrides], tmp_path,
                         data_root)  # fmt: skip
    with pytest.raises(ValueError) as err:
        pipeline.run(cfg)
    (line,) = str(err.value).splitlines()
    return line


def test_records_folder_replaced_by_a_file(no_model, tmp_path, data_root):
    (tmp_path / "records").write_text("not a folder")
    line = error_of(tmp_path, data_root)
    assert f"{tmp_path / 'records'} is a file, not a dir" in line
    assert line.startswith(f"paths.records_dir='{tmp_path}'")
    assert not (tmp_path / "results.csv").exists()


def test_table_replaced_by_a_directory(no_model, tmp_path, data_root):
    (tmp_path / "results.csv").mkdir()
    line = error_of(tmp_path, data_root)
    assert f"{tmp_path / 'results.csv'} is a directory, not a file" in line


@pytest.mark.skipif(ROOT_USER, reason="root can write any file")
@pytest.mark.parametrize("entry", ["records", "failures", "results.csv.lock"])
def test_entries_of_another_user_under_umask_022(no_model, tmp_path, data_root, entry):
    """A group-writable root that another user filled under umask 022: its folders and lock
    file are 0755/0644, so this user may not write them (simulated by dropping the write bits)."""
    path = tmp_path / entry
    path.mkdir() if "." not in entry else path.write_text("")
    path.chmod(0o755 if path.is_dir() else 0o644)
    path.chmod(path.stat().st_mode & ~0o222)
    try:
        line = error_of(tmp_path, data_root)
    finally:
        path.chmod(0o755)
    assert f"{path} is not writable for this user (owner " in line
    assert "mode 0" in line and "umask 002" in line


@pytest.mark.skipif(ROOT_USER, reason="root can write any folder")
def test_unwritable_cache_dir(no_model, tmp_path, data_root):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)
    try:
        line = error_of(tmp_path, data_root, "method=mka", f"method.cache={cache}")
    finally:
        cache.chmod(0o755)
    assert line.startswith(f"method.cache='{cache}': {cache} is not writable")


def test_records_dir_layout_passes_when_whole(tmp_path):
    for name in ("records", "failures", "claims"):
        (tmp_path / name).mkdir()
    (tmp_path / "results.csv").write_text("config_hash\n")
    (tmp_path / "results.csv.lock").write_text("")
    files.check_records_dir("paths.records_dir", str(tmp_path))  # no error


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args, "model=tiny_llama", "logger=none"],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.skipif(ROOT_USER, reason="root can write any folder")
@pytest.mark.parametrize("mode", [[], ["-m"]])
def test_runs_folder_of_another_user_is_one_line_before_hydra_makes_the_run_dir(tmp_path, mode):
    folder = "multirun" if mode else "runs"
    (tmp_path / folder).mkdir(mode=0o555)
    try:
        done = run_py(*mode, f"paths.output_root={tmp_path}")
    finally:
        (tmp_path / folder).chmod(0o755)
    assert done.returncode == 2, done.stdout[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1, done.stdout
    line = done.stdout.strip()
    key = "hydra.sweep.dir" if mode else "hydra.run.dir"
    assert line.startswith(f"ERROR: ConfigError: {key}='{tmp_path / folder}/")
    assert f": {tmp_path / folder} is not writable for this user" in line
