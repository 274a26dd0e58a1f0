"""Every class a yaml names (`_target_` in conf/method, repair, quant, logger, eval) keeps its
stage's contract in `mka_exp.contracts`: the members by name, each method's parameters by name
(the pipeline passes some by keyword), and, where the class builds here, isinstance."""

from __future__ import annotations

import importlib.util
import inspect
import typing

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mka_exp import contracts
from mka_exp.methods.base import LayerMethod as LayerMethodBase
from tests.helpers import CONF, compose_config

GROUPS = {
    "method": contracts.Method,
    "repair": contracts.Repair,
    "quant": contracts.Quantizer,
    "logger": contracts.Tracker,
    "eval": contracts.EvaluationBackend,  # once conf/eval names a backend class
}
TARGETS = [
    (group, path.stem, target)
    for group in GROUPS
    for path in sorted((CONF / group).glob("*.yaml"))
    if (target := OmegaConf.load(path).get("_target_"))
]


def target_class(target: str) -> type:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def contract_of(group: str, cls: type) -> type:
    """Layer methods keep the larger contract (`progressive`, `nested`, the amount)."""
    if group == "method" and issubclass(cls, LayerMethodBase):
        return contracts.LayerMethod
    return GROUPS[group]


def protocol_members(protocol: type) -> tuple[dict[str, typing.Callable], set[str]]:
    """(methods by name, data attribute names) of a protocol and the protocols it extends."""
    methods, data = {}, set()
    for klass in reversed(protocol.__mro__):
        if not getattr(klass, "_is_protocol", False) or klass is typing.Protocol:
            continue
        data |= set(vars(klass).get("__annotations__", {}))
        methods |= {n: f for n, f in vars(klass).items() if inspect.isfunction(f) and n[0] != "_"}
    return methods, data


def parameter_names(function) -> list[str]:
    return list(inspect.signature(function).parameters)[1:]  # without self


def signature_problems(cls: type, protocol: type) -> list[str]:
    """What `cls` lacks of `protocol`'s methods: a missing method, or parameters that differ in
    name or order (a class may add parameters after them, each with a default)."""
    problems, (methods, _) = [], protocol_members(protocol)
    for name, wanted in methods.items():
        found = getattr(cls, name, None)
        if not callable(found):
            problems.append(f"{cls.__name__} has no method {name}")
            continue
        want, have = parameter_names(wanted), parameter_names(found)
        extra = list(inspect.signature(found).parameters.values())[1 + len(want) :]
        required = [p.name for p in extra if p.default is p.empty and p.kind <= p.KEYWORD_ONLY]
        if have[: len(want)] != want or required:
            problems.append(
                f"{cls.__name__}.{name}{tuple(have)} != {protocol.__name__}{tuple(want)}"
            )
    return problems


@pytest.mark.parametrize(
    ("group", "option", "target"), TARGETS, ids=[f"{g}={o}" for g, o, _ in TARGETS]
)
def test_every_target_has_its_contract_methods(group, option, target):
    cls = target_class(target)
    assert signature_problems(cls, contract_of(group, cls)) == []


@pytest.mark.parametrize(
    ("group", "option", "target"), TARGETS, ids=[f"{g}={o}" for g, o, _ in TARGETS]
)
def test_every_target_built_from_its_yaml_is_an_instance(
    group, option, target, tmp_path, data_root
):
    """isinstance also checks the data attributes (`bits`, `nested`, ...), set by `__init__`."""
    if option.startswith("bnb_") and not torch.cuda.is_available():
        pytest.skip("bitsandbytes refuses to build without a GPU (test_quantizers checks that)")
    if (group, option) == ("eval", "vllm") and importlib.util.find_spec("vllm") is None:
        pytest.skip(
            "vLLM refuses to build where it is not installed (test_eval_backends checks that)"
        )
    cfg = compose_config([f"{group}={option}"], tmp_path, data_root)
    built = instantiate(cfg[group])
    protocol = contract_of(group, type(built))
    assert isinstance(built, protocol)
    missing = protocol_members(protocol)[1] - set(dir(built))
    assert not missing, f"{option} lacks {missing}"


def test_only_layer_methods_keep_the_layer_contract(tmp_path, data_root):
    """`repair=linear` tells layer methods from the others by this contract."""
    for option in ("none", "sparsegpt"):
        cfg = compose_config([f"method={option}"], tmp_path, data_root)
        assert not isinstance(instantiate(cfg.method), contracts.LayerMethod), option


class RenamedRepair:
    def check_method(self, method) -> None: ...

    def prepare(self, model, calibration) -> None: ...  # `calib` renamed

    def fix(self, model, calib, method_stats, dense) -> dict: ...  # `repair` renamed


def test_the_check_catches_a_renamed_method_and_a_renamed_parameter():
    problems = signature_problems(RenamedRepair, contracts.Repair)
    assert problems == [
        "RenamedRepair.prepare('model', 'calibration') != Repair('model', 'calib')",
        "RenamedRepair has no method repair",
    ]


def test_contracts_import_nothing_but_the_standard_library():
    """Floor 0: torch, transformers and pandas are named for the type checker only."""
    source = inspect.getsource(contracts)
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert all(line.split()[1] in {"__future__", "collections.abc", "pathlib", "typing"}
               for line in top_level), top_level  # fmt: skip
