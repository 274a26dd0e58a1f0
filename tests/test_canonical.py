"""One experiment, one config hash (`mka_exp/canonical.py`): keys that no component reads are
refused in one line with the closest key, a task named twice is evaluated once, and the configs
already recorded keep their hashes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from mka_exp import canonical, pipeline, preflight
from mka_exp.checks import ConfigError
from mka_exp.results import records as results
from tests.helpers import CONF, REPO_ROOT, compose_config

EVIDENCE = sorted((REPO_ROOT / "docs" / "evidence").glob("*/records/*.json"))


def error_of(tmp_path, data_root, *overrides: str) -> list[str]:
    cfg = compose_config(["method=mka", "eval.tasks=[piqa]", *overrides], tmp_path, data_root)
    with pytest.raises(ConfigError) as err:
        pipeline.run(cfg)
    return err.value.problems


def test_a_top_level_key_nothing_reads_is_one_line(no_model, tmp_path, data_root):
    (line,) = error_of(tmp_path, data_root, "+foo=bar")
    assert line.startswith("foo='bar': nothing reads it, so it would change only the config hash")
    assert "allowed: calib, compare, curve, data_root, eval," in line


def test_a_group_outside_the_defaults_list_is_readable(tmp_path, data_root):
    """`+compare=...` selects a group that conf/config.yaml does not list (the report reads it):
    derived from the tree, it passes; a key its yamls lack does not."""
    cfg = compose_config(["+compare=mka_vs_pruning"], tmp_path, data_root)
    config = OmegaConf.to_container(cfg, resolve=False)
    canonical.check_known_keys(config, CONF)  # no error
    config["compare"]["alhpa"] = 0.01
    with pytest.raises(ConfigError, match="compare.alhpa=0.01: .*did you mean compare.alpha"):
        canonical.check_known_keys(config, CONF)


def test_a_misspelt_method_key_gets_the_closest_one(no_model, tmp_path, data_root):
    (line,) = error_of(tmp_path, data_root, "+method.ratoi=0.25")
    assert line.startswith("method.ratoi=0.25: MKA has no setting 'ratoi'")
    assert line.endswith("did you mean method.ratio?")


def test_every_unknown_key_is_listed_at_once(no_model, tmp_path, data_root):
    lines = error_of(tmp_path, data_root, "+eval.limt=3", "+calib.seed2=1", "+repair.ridg=1")
    by_key = {line.split("=")[0]: line for line in lines}
    assert sorted(by_key) == ["calib.seed2", "eval.limt", "repair.ridg"]
    assert by_key["eval.limt"].startswith("eval.limt=3: HFEvaluation has no setting 'limt'")
    assert by_key["eval.limt"].endswith("did you mean eval.limit?")
    assert by_key["repair.ridg"].startswith("repair.ridg=1: NoRepair has no setting 'ridg'")


def test_a_new_parameter_of_a_component_is_readable_at_once(monkeypatch):
    """Keys are derived from signatures: a parameter another change adds needs no list here."""

    def evaluation(tasks, limit=None, sample_seed=None):
        return {}

    monkeypatch.setattr("mka_exp.evaluation.hf.HFEvaluation", evaluation)
    config = {"eval": {"tasks": ["piqa"], "limit": 2, "sample_seed": 3}}
    canonical.check_known_keys(config, CONF)  # no error
    with pytest.raises(ConfigError, match="eval.batch_size=8: HFEvaluation has no setting"):
        canonical.check_known_keys({"eval": {**config["eval"], "batch_size": 8}}, CONF)


@pytest.mark.parametrize("group", ["model", "calib", "method", "repair", "quant", "eval", "logger"])
def test_every_shipped_option_passes(tmp_path, data_root, group):
    for option in sorted((CONF / group).glob("*.yaml")):
        cfg = compose_config([f"{group}={option.stem}"], tmp_path, data_root)
        config = OmegaConf.to_container(cfg, resolve=False)
        canonical.check_known_keys(config, CONF)  # no error


def test_override_of_a_key_the_yaml_lacks_is_one_line_before_hydra(tmp_path):
    args = [sys.executable, "run.py", "model=tiny_llama", "logger=none", "method.ratoi=0.25",
            f"paths.output_root={tmp_path}"]  # fmt: skip
    done = subprocess.run(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout[-3000:]
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith("ERROR: ConfigError: method.ratoi=0.25: MKA has no setting 'ratoi'")
    assert line.endswith("did you mean method.ratio?")


def test_override_checks_follow_the_selected_option():
    argv = ["method=reverse_prune", "method.pairing=x", "method.keep_final=false"]
    line = canonical.override_key_problem("method.pairing=x", argv, CONF)
    assert line.startswith("method.pairing='x': ReversePrune has no setting 'pairing'")
    assert canonical.override_key_problem("method.keep_final=false", argv, CONF) is None
    assert canonical.override_key_problem("method.pairing=x", ["method.pairing=x"], CONF) is None
    assert canonical.override_key_problem("eval.seed=1", ["eval.seed=1"], CONF) == (
        "eval.seed=1: not set by eval's yaml; add it with +eval.seed=1"
    )
    assert canonical.override_key_problem("+foo=1", ["+foo=1"], CONF) is None  # the pipeline's


def point_hash(cfg) -> str:
    return results.config_hash(OmegaConf.to_container(cfg, resolve=True))


def test_a_task_named_twice_is_one_experiment(tmp_path, data_root, caplog):
    twice = compose_config(["eval.tasks=[piqa,hellaswag,piqa]"], tmp_path, data_root)
    once = compose_config(["eval.tasks=[piqa,hellaswag]"], tmp_path, data_root)
    assert point_hash(twice) != point_hash(once)
    with caplog.at_level(logging.WARNING):
        preflight.canonicalise(twice)
        preflight.canonicalise(once)
    assert point_hash(twice) == point_hash(once)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "names piqa more than once; evaluating each once: eval.tasks=['piqa', 'hellaswag']" in (
        warning
    )


@pytest.mark.skipif(not EVIDENCE, reason="no evidence records in this checkout")
def test_recorded_configs_pass_and_keep_their_hashes(data_root):
    """Every committed evidence record: its config has no unknown key, is already canonical,
    and still hashes to its record's key (the mirror's fingerprint does not depend on its path)."""
    for path in EVIDENCE:
        record = json.loads(path.read_text())
        config = record["config"]
        config["data_root"] = config["eval"]["data_root"] = str(data_root)
        if "data_root" in config["calib"]:
            config["calib"]["data_root"] = str(data_root)
        canonical.check_known_keys(config, CONF)
        tasks = config["eval"]["tasks"]
        assert canonical.unique_tasks(tasks) == (tasks, [])
        assert results.config_hash(config) == record["config_hash"] == path.stem, path


def test_unique_tasks_keeps_the_first_order():
    assert canonical.unique_tasks(["a", "b", "a", "c", "b"]) == (["a", "b", "c"], ["a", "b"])
    assert canonical.unique_tasks("piqa") == ("piqa", [])  # not a list: check_task_list says so


def test_an_unquoted_non_ascii_value_gets_the_quoting_hint():
    line = canonical.unquoted_non_ascii("paths.output_root=/tmp/outé")
    assert line.startswith("paths.output_root=/tmp/outé: Hydra reads non-ASCII characters only")
    assert "\"paths.output_root='/tmp/outé'\"" in line
    assert canonical.unquoted_non_ascii("paths.output_root='/tmp/outé'") is None
    assert canonical.unquoted_non_ascii("paths.output_root=/tmp/out") is None
    done = subprocess.run(
        [sys.executable, "run.py", "model=tiny_llama", "paths.output_root=/tmp/outé"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "LexerNoViableAlt" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"ERROR: ConfigError: {line}"]


def test_eval_none_under_an_experiment_that_names_tasks_is_refused_before_the_model(
    tmp_path, data_root
):
    """`experiment=X eval=none` where X sets eval.tasks: Hydra applies the experiment's keys after
    the group, so the run evaluated X's tasks regardless (issue 28: a preparation run meant to
    fill caches reached MMLU's test questions). One line, exit 2, before the model loads."""
    args = [sys.executable, "run.py", "experiment=qwen15b_declared", "model=tiny_llama",
            "logger=none", "eval=none", f"data_root={data_root}",
            f"paths.output_root={tmp_path}"]  # fmt: skip
    done = subprocess.run(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout[-3000:]
    (line,) = [x for x in done.stdout.strip().splitlines() if "ERROR" in x]
    assert "eval=none" in line and "eval.tasks=['mmlu']" in line and "eval.tasks=[]" in line
    assert "stage load" not in done.stdout
