"""What the report needs to know about each method, kept next to the methods.

One entry per `conf/method/<name>.yaml` (`tests/test_registry.py` fails when one is missing):

    family        pruning (removes layers) | merging (merges layers) | sparsity (zeroes weights) |
                  none (the dense model); the report's "best pruning" baseline is the best run of
                  the pruning family, "does merging beat pruning?" compares the two families
    color, marker one per method, shared by every figure (matplotlib colour and marker codes)
    variant_keys  the method's options that tell its runs apart in a table (`lam=code, ...`);
                  other options (caches, batch sizes, seeds of a sampler) never label a variant

The tuple order is the display order of tables and legends. Adding a method the report handles
right is its module, its yaml and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("none", "pruning", "merging", "sparsity")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    color: str
    marker: str
    variant_keys: tuple[str, ...] = ()


# Colours: matplotlib's tab10, one hue per method (grey is the dense line's, not a method's).
MKA_KEYS = ("pairing", "lam", "scope", "similarity", "bandwidth")
LACO_KEYS = ("m", "threshold", "min_interval", "fallback", "num_prompts")
SPARSEGPT_KEYS = ("mask_structure", "block_size", "dampening_frac")
REGISTRY = (
    MethodInfo("none", "none", "black", "*"),
    MethodInfo("reverse_prune", "pruning", "tab:blue", "o", ("keep_final",)),
    MethodInfo("shortgpt", "pruning", "tab:orange", "s", ("representation", "max_points")),
    MethodInfo("angular", "pruning", "tab:green", "D", ("representation", "max_points")),
    MethodInfo("sleb", "pruning", "tab:purple", "v"),
    MethodInfo("mka", "merging", "tab:red", "^", MKA_KEYS),
    MethodInfo("laco", "merging", "tab:brown", "P", LACO_KEYS),
    MethodInfo("sparsegpt", "sparsity", "tab:pink", "X", SPARSEGPT_KEYS),
)
METHODS = {info.name: info for info in REGISTRY}
UNKNOWN = MethodInfo("?", "none", "tab:gray", "h")  # a record of a method this code lacks


def info(method: str) -> MethodInfo:
    """The method's entry; an unknown name (an old record) draws grey and sorts last."""
    return METHODS.get(method, UNKNOWN)


def order(method: str) -> int:
    """Display position: registry order, unknown methods last."""
    names = list(METHODS)
    return names.index(method) if method in METHODS else len(names)


def of_family(family: str) -> tuple[str, ...]:
    """The methods of one family, in display order."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    return tuple(m.name for m in REGISTRY if m.family == family)
