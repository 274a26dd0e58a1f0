"""OmegaConf resolvers the config tree uses: `${unique:}` in `hydra.run.dir` and
`hydra.sweep.dir`, six random hex digits drawn once per config (cached, and copied with the
config to submitit jobs) after the date and time, so runs started in the same second get
directories of their own.

Registered when `mka_exp` is imported, so every way of composing the config (run.py, Hydra's
compose API in a notebook or a test, a submitit job) resolves it. Imports nothing of mka_exp.
"""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf


def unique_suffix() -> str:
    return secrets.token_hex(3)


if not OmegaConf.has_resolver("unique"):
    OmegaConf.register_new_resolver("unique", unique_suffix, use_cache=True)
