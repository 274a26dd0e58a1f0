"""The method registry covers every method config and says true things about it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mka_exp.methods import registry

CONF = Path(__file__).resolve().parent.parent / "conf" / "method"
YAMLS = sorted(p.stem for p in CONF.glob("*.yaml"))


def test_every_method_config_has_an_entry():
    assert YAMLS, f"no method configs under {CONF}"
    missing = [name for name in YAMLS if name not in registry.METHODS]
    assert not missing, f"conf/method/{missing[0]}.yaml has no entry in mka_exp/methods/registry.py"


def test_every_entry_has_a_config():
    assert sorted(registry.METHODS) == YAMLS


@pytest.mark.parametrize("name", YAMLS)
def test_variant_keys_are_options_of_the_method(name):
    options = yaml.safe_load((CONF / f"{name}.yaml").read_text()) or {}
    entry = registry.METHODS[name]
    # bandwidth is an MKA option its yaml leaves at the class default (README: "add bandwidth=8")
    unknown = set(entry.variant_keys) - set(options) - {"bandwidth"}
    assert not unknown, f"{name}: variant keys {sorted(unknown)} are not options in its yaml"
    assert entry.family in registry.FAMILIES


def test_colors_and_markers_are_distinct():
    colors = [m.color for m in registry.REGISTRY]
    markers = [m.marker for m in registry.REGISTRY]
    assert len(set(colors)) == len(colors) and len(set(markers)) == len(markers)
    assert registry.UNKNOWN.color not in colors


def test_order_and_families():
    assert registry.order("none") == 0
    assert registry.order("not_a_method") == len(registry.REGISTRY)
    assert registry.of_family("pruning") == ("reverse_prune", "shortgpt", "angular", "sleb")
    assert registry.of_family("merging") == ("mka", "laco")
    with pytest.raises(ValueError, match="pruning"):
        registry.of_family("prunning")
