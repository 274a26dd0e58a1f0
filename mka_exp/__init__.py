"""mka-exp: layer merging and pruning experiments on Hugging Face decoder LLMs (see README)."""

# The config's run directories use ${unique:}; registering it here means every way of composing
# the config (run.py, Hydra's compose API in a notebook or a test) resolves it, not only runs
# that happened to import mka_exp.sweep.callbacks first.
from mka_exp.sweep import callbacks as _sweep  # noqa: F401  (registers the resolver)
