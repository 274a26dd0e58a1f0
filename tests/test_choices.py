"""Close-match suggestions for unknown group options, checked before Hydra composes."""

from pathlib import Path

import pytest

from mka_exp.choices import did_you_mean, group_options, unknown_group_option

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_did_you_mean_names_the_closest_or_nothing():
    assert did_you_mean("shortgtp", ["mka", "shortgpt", "sleb"]) == "; did you mean shortgpt?"
    assert did_you_mean("zzz", ["mka", "shortgpt"]) == ""


def test_group_options_are_the_yaml_files():
    assert {"mka", "shortgpt", "laco", "sleb"} <= set(group_options(CONF, "method"))
    assert group_options(CONF, "seed") == []


@pytest.mark.parametrize(
    "arg",
    [
        "method=mka",
        "+method=shortgpt",
        "method=mka,shortgpt",  # a sweep over options
        "quant=null",
        "method.ratio=0.25",  # a key, not a group
        "seed=3",  # no such group
        "hydra/launcher=submitit_local",  # Hydra's own groups hold plugin options too
        "method=choice(mka,shortgpt)",  # sweep functions are Hydra's to parse
        "-m",
        "--cfg",
    ],
)
def test_good_or_foreign_arguments_pass(arg):
    assert unknown_group_option(arg, CONF) is None


@pytest.mark.parametrize(
    ("arg", "start", "end"),
    [
        ("method=shortgtp", "method=shortgtp: unknown method 'shortgtp' (options: ", "shortgpt?)"),
        ("method=mka,slebb", "method=mka,slebb: unknown method 'slebb' (options: ", "sleb?)"),
        ("quant=gptqq", "quant=gptqq: unknown quant 'gptqq' (options: ", "gptq?)"),
        ("repair=nothing", "repair=nothing: unknown repair 'nothing' (options: linear, none", ")"),
    ],
)
def test_unknown_option_is_named_with_the_allowed_ones(arg, start, end):
    problem = unknown_group_option(arg, CONF)
    assert problem is not None and problem.startswith(start) and problem.endswith(end)
