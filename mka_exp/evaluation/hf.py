"""The default evaluation backend: lm-eval's HF model class on the model as it is in memory,
with the prefix cache (`conf/eval/{quick,paper,mmlu,none}.yaml`).

Why in memory: the model is wrapped with `HFLM(pretrained=model)`, never saved and reloaded, so
a curve evaluates after every compression step of one loaded model. `share_prefix` runs every
token prefix the requests share once (`prefix_cache.PrefixCacheHFLM`, same scores);
`prefix_cache_tokens` bounds its cache, `prefix_min_shared` its shortest split. `reuse` (a
store directory; null = off) shares hidden states across models (`reuse.Reuse`, same scores):
`reuse_layers` says which layers' inputs are kept (every n-th, or a list), `reuse_bytes` bounds
the store.

    HFEvaluation(tasks=["piqa"], limit=50).evaluate(model, tokenizer)  # (metrics, rows)
    evaluate(model, tokenizer, ["piqa"], limit=50)                     # metrics only
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mka_exp.evaluation import checks
from mka_exp.evaluation.backend import LMEvalBackend, plain
from mka_exp.evaluation.prefix_tree import DEFAULT_CACHE_TOKENS, DEFAULT_MIN_SHARED

log = logging.getLogger(__name__)

CPU_AUTO_BATCH_SIZE = 8
DEFAULT_REUSE_LAYERS = 4  # every 4th layer's input is stored when reuse is on
DEFAULT_REUSE_BYTES = 4 * 1024**3


@dataclass(kw_only=True)
class HFEvaluation(LMEvalBackend):
    """lm-eval's `HFLM` (with `share_prefix`: `PrefixCacheHFLM`) on the in-memory model."""

    share_prefix: bool = True
    prefix_cache_tokens: int = DEFAULT_CACHE_TOKENS
    prefix_min_shared: int = DEFAULT_MIN_SHARED
    reuse: str | bool | None = None
    reuse_layers: int | list[int] = DEFAULT_REUSE_LAYERS
    reuse_bytes: int = DEFAULT_REUSE_BYTES

    def __post_init__(self) -> None:
        self.reuse_layers = plain(self.reuse_layers)
        self.last_lm: Any = None  # the last evaluation's LM (its `stats`: benchmarks, tests)
        super().__post_init__()

    def setting_checks(self) -> list[Callable[[], Any]]:
        return [*super().setting_checks(), self.check_prefix_cache, self.check_reuse]

    def check_reuse(self) -> None:
        checks.check_reuse(self.reuse, self.reuse_layers, self.reuse_bytes, self.share_prefix)

    def check_prefix_cache(self) -> None:
        checks.check_prefix_cache(self.prefix_cache_tokens, self.prefix_min_shared)

    @contextlib.contextmanager
    def lm(self, model: Any, tokenizer: Any) -> Iterator[Any]:
        """HFLM keeps `model.device` and takes its max length from the model's config."""
        from lm_eval.models.huggingface import HFLM

        from mka_exp.evaluation.prefix_cache import PrefixCacheHFLM

        batch_size = resolve_batch_size(self.batch_size, model.device)
        settings = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if not self.share_prefix:
            yield HFLM(**settings)
            return
        cache = dict(cache_tokens=self.prefix_cache_tokens, min_shared=self.prefix_min_shared)
        self.last_lm = PrefixCacheHFLM(**settings, **cache, reuse=self.model_reuse(model))
        yield self.last_lm

    def model_reuse(self, model: Any) -> Any:
        """This model's side of the reuse cache (fingerprints hashed once per evaluation: the
        model may have changed since the last one), or None when reuse is off."""
        if self.reuse is None or self.reuse is False:
            return None
        from mka_exp.evaluation.reuse import Reuse
        from mka_exp.state_store import Store

        start = time.perf_counter()
        reuse = Reuse(model, Store(str(self.reuse), self.reuse_bytes), self.reuse_layers)
        log.info("reuse: fingerprints of %d layer prefixes in %.2f s",
                 len(reuse.prints), time.perf_counter() - start)  # fmt: skip
        return reuse


def resolve_batch_size(batch_size: int | str, device: torch.device) -> int | str:
    """lm-eval's "auto" tries 5 forwards at batch 64 and halves on CUDA out-of-memory errors; a
    CPU never raises one (it swaps or gets killed), so there "auto" means a fixed size."""
    if str(batch_size).startswith("auto") and torch.device(device).type == "cpu":
        log.info("eval batch_size=%s on CPU: using %d", batch_size, CPU_AUTO_BATCH_SIZE)
        return CPU_AUTO_BATCH_SIZE
    return batch_size


def evaluate(model: Any, tokenizer: Any, tasks: list[str], **settings: Any) -> dict[str, float]:
    """`{"<task>/<metric>": value}` of `HFEvaluation(tasks=tasks, **settings)` on the model
    (benchmarks and tests; the pipeline builds the backend from `conf/eval`)."""
    return HFEvaluation(tasks=tasks, **settings).scores(model, tokenizer)
