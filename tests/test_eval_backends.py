"""Evaluation as an object Hydra builds: every conf/eval yaml names its backend, the backend
checks its settings when built (one line each), the default backend's name leaves every record's
hash as it was, and a new backend (vLLM) is its module and its yaml, nothing else."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mka_exp import canonical
from mka_exp.checks import ConfigError
from mka_exp.evaluation.hf import HFEvaluation
from mka_exp.evaluation.rows import COLUMNS
from mka_exp.evaluation.vllm import VLLMEvaluation
from mka_exp.results.records import DEFAULT_EVAL_BACKEND, config_hash
from tests.helpers import CONF, compose_config

REPO = Path(__file__).resolve().parents[1]
HF_OPTIONS = ["quick", "paper", "mmlu", "none"]


@pytest.mark.parametrize("option", HF_OPTIONS)
def test_each_yaml_builds_the_default_backend(tmp_path, data_root, option):
    cfg = compose_config([f"eval={option}"], tmp_path, data_root)
    assert cfg.eval._target_ == DEFAULT_EVAL_BACKEND
    backend = instantiate(cfg.eval)
    assert type(backend) is HFEvaluation
    assert backend.tasks == list(cfg.eval.tasks) and type(backend.tasks) is list  # plain lists
    assert type(backend.num_fewshot) is dict and backend.data_root == str(data_root)


def test_default_backend_name_keeps_every_committed_evidence_hash(data_root):
    """Records written before eval had a `_target_` keep their hash; another backend's does not."""
    paths = sorted(REPO.glob("docs/evidence/*/records/*.json"))
    assert paths
    for path in paths:
        record = json.loads(path.read_text())
        config = {**record["config"], "data_root": str(data_root)}  # the same mirror, here
        named = {**config, "eval": {**config["eval"], "_target_": DEFAULT_EVAL_BACKEND}}
        assert config_hash(named) == record["config_hash"], path.name
        other = {**config, "eval": {**config["eval"], "_target_": "x.vllm.VLLMEvaluation"}}
        assert config_hash(other) != record["config_hash"]


def test_bad_settings_are_one_line_each():
    bad = dict(tasks="piqa", limit=0, sample_seed=-1, batch_size=0, num_fewshot={"piqa": -1})
    with pytest.raises(ConfigError) as err:
        HFEvaluation(**bad, prefix_cache_tokens=0, prefix_min_shared=2.5)
    keys = [line.split("=", 1)[0] for line in err.value.problems]
    assert keys == ["eval.tasks", "eval.limit", "eval.sample_seed", "eval.batch_size",
                    "eval.num_fewshot.piqa", "eval.prefix_cache_tokens",
                    "eval.prefix_min_shared"]  # fmt: skip
    assert all("allowed" in line and "\n" not in line for line in err.value.problems)


def test_bad_settings_stop_the_run_before_the_model_loads(tmp_path, data_root):
    from mka_exp.preflight import check_config

    cfg = compose_config(["eval.limit=0", "eval.batch_size=0"], tmp_path, data_root)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert err.value.problems == [
        "eval.limit=0: allowed an int > 0 (examples per task), a float in (0, 1] (a fraction) "
        "or null (all)",
        "eval.batch_size=0: allowed an integer >= 1, auto or auto:N",
    ]


def test_vllm_not_installed_is_one_line_before_the_model_loads(tmp_path, data_root, monkeypatch):
    from mka_exp import pipeline

    real = importlib.util.find_spec  # as on a machine without vLLM, wherever this runs
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm"
                        else real(name, *a))  # fmt: skip

    monkeypatch.setattr(pipeline, "load_session", lambda *a: pytest.fail("model loaded"))
    cfg = compose_config(["eval=vllm"], tmp_path, data_root)
    with pytest.raises(ConfigError) as err:
        pipeline.run(cfg)
    (line,) = err.value.problems
    assert line.startswith("eval=vllm: vLLM is not installed") and "pip install vllm" in line


@pytest.fixture
def vllm_here(monkeypatch):
    """As on a machine with vLLM: the settings checks alone."""
    monkeypatch.setattr(VLLMEvaluation, "check_installed", lambda self: None)


def test_vllm_backend_builds_from_its_yaml(vllm_here, tmp_path, data_root):
    cfg = compose_config(["eval=vllm", "eval.max_model_len=2048"], tmp_path, data_root)
    backend = instantiate(cfg.eval)
    assert type(backend) is VLLMEvaluation and backend.tasks == list(cfg.eval.tasks)
    assert (backend.max_model_len, backend.gpu_memory_utilization) == (2048, 0.8)


def test_vllm_bad_settings_are_one_line_each(vllm_here):
    with pytest.raises(ConfigError) as err:
        VLLMEvaluation(tasks=["piqa"], gpu_memory_utilization=1.5, tensor_parallel_size=0,
                       max_model_len=-1, dtype="fp8")  # fmt: skip
    assert [line.split(":", 1)[0] for line in err.value.problems] == [
        "eval.gpu_memory_utilization=1.5",
        "eval.tensor_parallel_size=0",
        "eval.max_model_len=-1",
        "eval.dtype='fp8'",
    ]


def test_a_new_backend_is_its_module_and_its_yaml(tmp_path, data_root):
    """Its keys are read from its signature (`canonical` lists nothing), a typo gets the closest
    key, and no other file of the package or the config tree names it."""
    cfg = compose_config(["eval=vllm"], tmp_path, data_root)
    config = OmegaConf.to_container(cfg, resolve=False)
    canonical.check_known_keys(config, CONF)  # no error
    config["eval"]["gpu_memory_utilisation"] = 0.5
    with pytest.raises(ConfigError, match=r"eval\.gpu_memory_utilisation=0\.5: VLLMEvaluation "
                       r"has no setting .*did you mean eval\.gpu_memory_utilization\?"):  # fmt: skip
        canonical.check_known_keys(config, CONF)
    files = [*REPO.glob("mka_exp/**/*.py"), *REPO.glob("conf/**/*.yaml")]
    naming = {p.relative_to(REPO).as_posix() for p in files
              if "VLLMEvaluation" in p.read_text() or "evaluation.vllm" in p.read_text()}  # fmt: skip
    assert naming == {"mka_exp/evaluation/vllm.py", "conf/eval/vllm.yaml"}


def test_backends_hold_the_evaluation_contract():
    """A built default backend is a `contracts.EvaluationBackend` (tasks, check_data, evaluate);
    tests/test_contracts.py checks the names and parameters of every eval `_target_`."""
    from mka_exp.contracts import EvaluationBackend

    backend = HFEvaluation(tasks=["piqa"])
    assert isinstance(backend, EvaluationBackend) and backend.tasks == ["piqa"]


def test_no_tasks_builds_no_tasks(tmp_path, data_root):
    backend = HFEvaluation(tasks=[], data_root=str(data_root))
    backend.check_data()  # reads nothing
    flat, rows = backend.evaluate(None, None)  # no model is touched
    assert flat == {} and rows.empty and tuple(rows.columns) == COLUMNS
