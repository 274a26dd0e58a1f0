"""lm-eval's HFLM with multiple-choice scoring that runs each shared context once.

Why: lm-eval scores a multiple-choice question as one `(context, choice)` request per choice
and runs every request as its own sequence, so the context goes through the model once per
choice. On RACE (a ~600-token article, 4 short answers) that is ~4x the work needed, and on CPU
evaluation is the bulk of a sweep. lm-eval only shares work when every choice is a single token
(its `logits_cache`); its own code carries a TODO for this middleware.

`SharedPrefixHFLM` groups the requests by their (truncated) context and runs batches of contexts
(left-padded, longest first) once with the KV cache on and only the last position's logits
(`logits_to_keep=1`); each context's cache rows are then repeated for its continuations, which
all run in a second, right-padded batch. `eval.batch_size` bounds the continuations per batch. Tokenization,
left truncation, the scored positions and the `(sum log p, is_greedy)` answers are lm-eval's:
`tests/test_shared_prefix.py` checks the answers against `HFLM` itself. Only decoder-only models
are handled here; anything else (and `loglikelihood_rolling`'s windows) takes lm-eval's path.

`eval.share_prefix=true` now builds `mka_exp.evaluation.prefix_cache.PrefixCacheHFLM`, which subclasses this
and also shares prefixes between contexts (few-shot examples); this class stays as its base and
as the "shared contexts" baseline of `benchmarks/eval_throughput.py --prefix-cache`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from mka_exp.evaluation.prefix_tree import Request, group_by_prefix


class SharedPrefixHFLM(HFLM):
    """HFLM whose loglikelihood runs each distinct context once per group of continuations."""

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal" or any(req[0] is None for req in requests):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        groups = group_by_prefix(requests, self.max_length)
        bar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (shared contexts)",
        )
        for chunk in chunk_groups(groups, self.rows_per_batch(requests, override_bs)):
            conts = [[requests[i][2] for i in groups[prefix]] for prefix in chunk]
            scored = self.score_groups([list(prefix) for prefix in chunk], conts)
            for i, answer in zip([i for p in chunk for i in groups[p]], scored, strict=True):
                answers[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(scored))
        bar.close()
        return answers  # type: ignore[return-value]

    def rows_per_batch(self, requests: list[Request], override_bs: int | None) -> int:
        """Continuations per forward: the batch size, or lm-eval's out-of-memory search for
        "auto" on the longest request (a full forward of it needs more than our two parts)."""
        size = override_bs or self.batch_size
        if str(size).startswith("auto"):
            longest = max(requests, key=lambda req: len(req[1]) + len(req[2]))
            return int(self._detect_batch_size([longest]))
        return int(size)

    @torch.no_grad()
    def score_groups(
        self, prefixes: list[list[int]], conts: list[list[list[int]]]
    ) -> list[tuple[float, bool]]:
        """`(sum log p(cont | prefix), every cont token greedy)` for each continuation of each
        prefix, flattened in order. Prefixes are left-padded into one batch (masked, positions
        counted from each prefix's first token); all continuations share the second forward."""
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            ids, mask = self.left_pad(prefixes)
            positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
            out = self.model(
                ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            owner = torch.tensor([g for g, group in enumerate(conts) for _ in group])
            first = out.logits[owner.to(self.device), -1:]  # predicts each first cont token
            flat = [cont for group in conts for cont in group]
            width = max(len(cont) - 1 for cont in flat)
            if width == 0:  # single-token continuations: the context's logits are all we need
                return [answer(first[r], cont, self.softmax_dtype) for r, cont in enumerate(flat)]
            rest = self.continue_from(out.past_key_values, mask, owner, flat, width)
        return [
            answer(torch.cat([first[r], rest[r, : len(cont) - 1]]), cont, self.softmax_dtype)
            for r, cont in enumerate(flat)
        ]

    @property
    def pad_id(self) -> int:
        """Filler for padded slots: masked on the left, after every real token on the right."""
        return self.tokenizer.pad_token_id or 0

    def left_pad(self, prefixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prefixes))
        ids = [[self.pad_id] * (width - len(p)) + p for p in prefixes]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prefixes]
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=self.device)
        return as_tensor(ids), as_tensor(mask)

    def continue_from(
        self,
        cache: Any,
        mask: torch.Tensor,
        owner: torch.Tensor,
        conts: list[list[int]],
        width: int,
    ) -> torch.Tensor:
        """Logits `[rows, width, V]` of every continuation but its last token, each row run on
        its own prefix's KV cache; tails are right-padded (never attended by real tokens)."""
        owner = owner.to(self.device)
        cache.batch_select_indices(owner)
        tails = [cont[:-1] + [self.pad_id] * (width - len(cont) + 1) for cont in conts]
        ids = torch.tensor(tails, dtype=torch.long, device=self.device)
        steps = torch.arange(width, device=self.device)
        positions = mask.sum(dim=1)[owner, None] + steps
        attention = torch.cat([mask[owner], torch.ones_like(ids)], dim=1)
        return self.model(
            ids, attention_mask=attention, position_ids=positions, past_key_values=cache
        ).logits


def chunk_groups(
    groups: dict[tuple[int, ...], list[int]], rows: int
) -> list[list[tuple[int, ...]]]:
    """Prefixes, longest first (little padding, out-of-memory at once), in chunks of at most
    `rows` continuations; a group larger than `rows` gets a chunk of its own."""
    chunks: list[list[tuple[int, ...]]] = []
    count = 0
    for prefix in sorted(groups, key=len, reverse=True):
        if not chunks or count + len(groups[prefix]) > rows:
            chunks.append([])
            count = 0
        chunks[-1].append(prefix)
        count += len(groups[prefix])
    return chunks


def answer(logits: torch.Tensor, cont: list[int], dtype: Any) -> tuple[float, bool]:
    """lm-eval's answer from the logits that predict each continuation token, `[len(cont), V]`."""
    logprobs = F.log_softmax(logits, dim=-1, dtype=dtype)
    target = torch.tensor(cont, dtype=torch.long, device=logits.device)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return float(logprobs.gather(1, target[:, None]).sum()), greedy
