"""Every option of every config group composes; everything but hub models instantiates."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from tests.helpers import CONF, compose_config

GROUPS = ("model", "calib", "method", "repair", "quant", "eval", "logger", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL = [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_and_builds(group, option, tmp_path, data_root, tiny):
    cfg = compose_config([f"{group}={option}"], tmp_path, data_root)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    node = cfg.get(group, None)
    if group == "experiment" or node is None or "_target_" not in node:
        return
    if group == "model":  # hub models cannot load offline: check the loader accepts every key
        keys = {k: v for k, v in node.items() if k != "_target_"}
        inspect.signature(get_method(node._target_)).bind(**keys)
        return
    if group == "calib":
        if option == "text":
            node.path = str(data_root / "baber/piqa/default/validation.jsonl")
            node.field = "goal"
        built = instantiate(node, tokenizer=tiny.tokenizer)
        assert len(built) > 0 and built.input_ids.shape[0] == len(built)
        return
    if option == "vllm" and importlib.util.find_spec("vllm") is None:
        with pytest.raises(Exception, match="pip install vllm"):
            instantiate(node)
        return
    if option.startswith("bnb_") and not torch.cuda.is_available():
        with pytest.raises(Exception, match="bitsandbytes needs a CUDA GPU"):
            instantiate(node)
        return
    assert instantiate(node) is not None


def test_groups_have_options():
    for group in ("model", "calib", "method", "eval", "logger"):
        assert options(group), group


NEW = [("repair", "none"), ("repair", "linear"), ("method", "laco"), ("method", "sleb")]
WITH_QUANT = [(g, o, q) for g, o in NEW for q in options("quant")]


@pytest.mark.parametrize(
    ("group", "option", "quant"), WITH_QUANT, ids=[f"{g}={o}-quant={q}" for g, o, q in WITH_QUANT]
)
def test_repair_and_new_methods_compose_with_every_quantizer(
    group, option, quant, tmp_path, data_root
):
    """`method=mka repair=linear quant=gptq` and friends: the config resolves and every part builds."""
    cfg = compose_config([f"{group}={option}", f"quant={quant}"], tmp_path, data_root)
    OmegaConf.to_container(cfg, resolve=True)
    method, repair = instantiate(cfg.method), instantiate(cfg.repair)
    repair.check_method(method)  # every layer method is one a repair can follow
    if quant.startswith("bnb_") and not torch.cuda.is_available():
        return  # bitsandbytes needs a GPU (test_option_composes_and_builds checks the message)
    assert instantiate(cfg.quant) is not None
