"""mka-exp: layer merging and pruning experiments on Hugging Face decoder LLMs (see README and
docs/ARCHITECTURE.md for the stages and what each folder owns)."""

# The config's run directories use ${unique:}; registering it on import means every way of
# composing the config resolves it, not only runs that happened to import the sweep callbacks.
from mka_exp import resolvers as _resolvers  # noqa: F401  (registers the resolver)
