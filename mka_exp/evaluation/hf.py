"""The default evaluation backend: lm-eval's HF model class on the model as it is in memory,
with the prefix cache (`conf/eval/{quick,paper,mmlu,none}.yaml`).

Why in memory: the model is wrapped with `HFLM(pretrained=model)`, never saved and reloaded, so
a curve evaluates after every compression step of one loaded model. `share_prefix` runs every
token prefix the requests share once (`prefix_cache.PrefixCacheHFLM`, same scores);
`prefix_cache_tokens` bounds its cache, `prefix_min_shared` its shortest split.

    HFEvaluation(tasks=["piqa"], limit=50).evaluate(model, tokenizer)  # (metrics, rows)
    evaluate(model, tokenizer, ["piqa"], limit=50)                     # metrics only
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mka_exp.evaluation import checks
from mka_exp.evaluation.backend import LMEvalBackend
from mka_exp.evaluation.prefix_tree import DEFAULT_CACHE_TOKENS, DEFAULT_MIN_SHARED

log = logging.getLogger(__name__)

CPU_AUTO_BATCH_SIZE = 8


@dataclass(kw_only=True)
class HFEvaluation(LMEvalBackend):
    """lm-eval's `HFLM` (with `share_prefix`: `PrefixCacheHFLM`) on the in-memory model."""

    share_prefix: bool = True
    prefix_cache_tokens: int = DEFAULT_CACHE_TOKENS
    prefix_min_shared: int = DEFAULT_MIN_SHARED

    def setting_checks(self) -> list[Callable[[], Any]]:
        return [*super().setting_checks(), self.check_prefix_cache]

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
        yield PrefixCacheHFLM(**settings, **cache)


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
