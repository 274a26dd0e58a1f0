"""lm-eval's HFLM with a prefix cache across loglikelihood requests: every token prefix that
requests share (a subject's five few-shot examples, a question shared by its answer choices)
runs through the model once.

Why: lm-eval runs each `(context, continuation)` request as its own sequence. In 5-shot MMLU,
the paper's headline metric, every question of a subject repeats the same five worked examples
(80-90 % of its tokens); on CPU that repetition is most of a sweep's time. vLLM's automatic prefix
caching and SGLang's RadixAttention (arXiv 2312.07104) share such prefixes on their own engines;
this does it for lm-eval's HF backend with the in-memory model.

How: the requests' contexts, after lm-eval's left truncation, go into a radix tree. A node is a
run of tokens shared by every context below it; a node shorter than `min_shared` tokens with no
context ending on it is copied into its children instead (a split costs a forward and a cache
copy, sharing a few tokens saves nothing). Continuations but their last token hang below their
context's node as leaves. The tree runs level by level: a level's nodes go in batches, each row
on a copy of its parent's KV cache (left-padded, so the distances between real tokens, which
RoPE and sliding windows see, are those of the unshared sequence; position ids count from the
row's first real token) and right-padded in its own tokens; the KV of nodes with children is kept
until their subtree is done. Only the logits that score a token are computed (a hook on the
output embedding gathers those positions). `cache_tokens` bounds both the tokens whose KV is kept
(each level keeps at most half of what its ancestors left) and the token slots (rows x
(past + width)) of one forward; a node that cannot fit falls back to `HFLM` for every request below
it. Answers are lm-eval's `(sum log p, is_greedy)`: `tests/test_prefix_cache.py` checks them
against `HFLM` on Llama, Qwen2, Qwen3 and Gemma3 configs. Anything but decoder-only models and
`loglikelihood` requests (rolling windows; generation never comes here) takes lm-eval's path.

Example (conf/eval/*.yaml; `share_prefix: false` gives plain HFLM)::

    share_prefix: true
    prefix_cache_tokens: 16384  # KV tokens kept at once, and token slots of one forward
    prefix_min_shared: 16       # shorter shared runs are recomputed, not split off
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers import DynamicCache

from mka_exp.evaluation.checks import check_prefix_cache
from mka_exp.evaluation.prefix_tree import (
    DEFAULT_CACHE_TOKENS,
    DEFAULT_MIN_SHARED,
    Node,
    Request,
    build_tree,
    requested_tokens,
)
from mka_exp.evaluation.reuse import Reuse, ReuseMiss
from mka_exp.layers import decoder_layers

log = logging.getLogger(__name__)

MAX_PADDING = 0.2


class PrefixCacheHFLM(HFLM):
    """HFLM whose loglikelihood runs every shared prefix of its requests once."""

    def __init__(
        self,
        *args: Any,
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        min_shared: int = DEFAULT_MIN_SHARED,
        reuse: Reuse | None = None,
        **kwargs: Any,
    ) -> None:
        check_prefix_cache(cache_tokens, min_shared)
        super().__init__(*args, **kwargs)
        self.cache_tokens, self.min_shared = cache_tokens, min_shared
        self.reuse = reuse  # hidden states shared with other models (`reuse.Reuse`), or None
        self.stats: Counter[str] = Counter()  # summed over calls; see _loglikelihood_tokens

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        head = self.model.get_output_embeddings() if self.backend == "causal" else None
        if head is None or any(req[0] is None for req in requests):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        rows = self.rows_per_batch(requests, override_bs)
        root, _ = build_tree(requests, self.max_length, self.min_shared)
        start = self.reuse.start(root, self.cache_tokens) if self.reuse else 0
        try:
            run = self.run_tree(Run(self, requests, rows, start), root, disable_tqdm)
        except ReuseMiss as miss:
            log.warning("reuse: %s; this call runs every layer", miss)
            root, _ = build_tree(requests, self.max_length, self.min_shared)
            self.reuse.index(root)  # type: ignore[union-attr]  # the new tree's keys (stores)
            run = self.run_tree(Run(self, requests, rows), root, disable_tqdm)
        answers = run.answers()
        if run.fallback:
            todo = sorted(run.fallback)
            log.info(
                "prefix cache: %d requests do not fit %d tokens; HFLM runs them",
                len(todo),
                self.cache_tokens,
            )
            plain = super()._loglikelihood_tokens(
                [requests[i] for i in todo], disable_tqdm, override_bs
            )
            answers.update(zip(todo, plain, strict=True))
        self.stats.update(
            requests=len(requests),
            requested_tokens=requested_tokens(requests, self.max_length),
            run_tokens=run.tokens,
            padded_tokens=run.padded,
            forwards=run.forwards,
            fallback_requests=len(run.fallback),
            layer_tokens=run.layer_tokens,
            scored_positions=run.scored,
            reuse_start=run.start,
        )
        return [answers[i] for i in range(len(requests))]

    def run_tree(self, run: Run, root: Node, disable_tqdm: bool) -> Run:
        run.bar = tqdm(
            total=len(run.requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (prefix cache)",
        )
        try:
            run.level(root.kids, self.cache_tokens)
        finally:
            run.bar.close()
        return run

    def rows_per_batch(self, requests: list[Request], override_bs: int | None) -> int:
        """Rows per forward: the batch size, or lm-eval's out-of-memory search for "auto" on the
        longest request (a full forward of it needs more than a node's row on its cache)."""
        size = override_bs or self.batch_size
        if str(size).startswith("auto"):
            longest = max(requests, key=lambda req: len(req[1]) + len(req[2]))
            return int(self._detect_batch_size([longest]))
        return int(size)

    @property
    def pad_id(self) -> int:
        """Filler for padded slots: masked on the left, after every real token on the right."""
        return self.tokenizer.pad_token_id or 0


class Run:
    """One `_loglikelihood_tokens` call: the tree's levels, its batches, the partial answers."""

    def __init__(
        self, lm: PrefixCacheHFLM, requests: list[Request], rows: int, start: int = 0
    ) -> None:
        self.lm, self.requests, self.rows = lm, requests, rows
        self.start = start  # first decoder layer run (those below come from `lm.reuse`)
        self.layers = len(decoder_layers(lm.model)) - start if lm.reuse else 0
        self.scores: dict[int, list[torch.Tensor]] = {}
        self.greedy: dict[int, bool] = {}
        self.fallback: set[int] = set()
        self.tokens = self.padded = self.forwards = self.layer_tokens = 0
        self.scored = 0  # positions the output embedding ran on (reuse cannot skip those)
        self.bar: Any = None

    def answers(self) -> dict[int, tuple[float, bool]]:
        return {i: self.answer(i) for i in self.scores if i not in self.fallback}

    def answer(self, i: int) -> tuple[float, bool]:
        return float(torch.stack(self.scores[i]).sum()), self.greedy[i]

    def done(self, i: int) -> None:
        """Request `i` is scored whole: handed to lm-eval's cache hook at once (with
        `eval.answer_cache` it is on disk before the next batch runs), and counted."""
        if i not in self.fallback:
            self.lm.cache_hook.add_partial("loglikelihood", self.requests[i][0], self.answer(i))
        self.bar.update(1)

    def level(self, nodes: list[Node], budget: int) -> None:
        """Run `nodes` (their parents' KV kept) in chunks whose kept KV fits half of `budget`,
        each chunk's children right after it, then drop the chunk's KV."""
        for chunk, kept in self.chunks(nodes, budget):
            for batch in self.batches(chunk):
                self.forward(batch)
            kids = [kid for node in chunk for kid in node.kids]
            if kids:
                self.level(kids, budget - kept)
            for node in chunk:
                node.kv = None

    def chunks(self, nodes: list[Node], budget: int) -> Iterator[tuple[list[Node], int]]:
        chunk: list[Node] = []
        kept = 0
        for node in sorted(nodes, key=lambda n: n.end, reverse=True):
            keep = len(node.tokens) if node.kids else 0
            if node.end > self.lm.cache_tokens or keep > budget:
                self.fall_back(node)
                continue
            if chunk and kept + keep > budget // 2:
                yield chunk, kept
                chunk, kept = [], 0
            chunk.append(node)
            kept += keep
        if chunk:
            yield chunk, kept

    def fall_back(self, node: Node) -> None:
        for below in node.subtree():
            self.fallback.update(below.ends)

    def batches(self, nodes: list[Node]) -> Iterator[list[Node]]:
        """At most `rows` rows and `cache_tokens` token slots each, longest rows first, a new
        batch where padding would pass MAX_PADDING of the input (on CPU padding is compute)."""
        batch: list[Node] = []
        past = width = real = 0
        for node in sorted(nodes, key=lambda n: (len(n.tokens), n.offset), reverse=True):
            new_past, new_width = max(past, node.offset), max(width, len(node.tokens))
            slots = (len(batch) + 1) * (new_past + new_width)
            real += len(node.tokens)
            padding = 1 - real / ((len(batch) + 1) * new_width)
            full = len(batch) >= self.rows or slots > self.lm.cache_tokens
            if batch and (full or padding > MAX_PADDING):
                yield batch
                batch, new_past, new_width = [], node.offset, len(node.tokens)
                real = len(node.tokens)
            batch.append(node)
            past, width = new_past, new_width
        if batch:
            yield batch

    @torch.no_grad()
    def forward(self, batch: list[Node]) -> None:
        lm, device = self.lm, self.lm.device
        offsets = [node.offset for node in batch]
        past, width = max(offsets), max(len(node.tokens) for node in batch)
        ids = torch.tensor(
            [n.tokens + [lm.pad_id] * (width - len(n.tokens)) for n in batch], device=device
        )
        positions = torch.tensor(offsets, device=device)[:, None] + torch.arange(
            width, device=device
        )
        mask = None
        if past and min(offsets) < past:  # left padding in the past: mask it
            mask = torch.tensor(
                [[0] * (past - o) + [1] * (o + width) for o in offsets], device=device
            )
        keep = any(node.kids for node in batch)
        cache = past_cache(batch, past) if past else (DynamicCache() if keep else None)
        rows, cols = wanted_positions(batch)
        self.scored += len(rows)
        with (
            torch.autocast(
                device_type=device.type,
                dtype=lm.mixed_precision_dtype,
                enabled=lm.mixed_precision_dtype is not None,
            ),
            gather_logits(lm.model, rows, cols),
            self.inputs(batch, ids) as inputs,
        ):
            out = lm.model(
                **inputs,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        self.forwards += 1
        self.tokens += sum(len(node.tokens) for node in batch)
        self.layer_tokens += self.layers * sum(len(node.tokens) for node in batch)
        self.padded += ids.numel()
        if keep:
            keep_kv(batch, out.past_key_values, past)
        self.score(batch, F.log_softmax(out.logits[0], dim=-1, dtype=lm.softmax_dtype))

    def inputs(
        self, batch: list[Node], ids: torch.Tensor
    ) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
        """Token ids, or with reuse the hidden states entering `start` (`Reuse.inputs`)."""
        if self.lm.reuse is None:
            return contextlib.nullcontext({"input_ids": ids})
        return self.lm.reuse.inputs(self.start, batch, ids)

    def score(self, batch: list[Node], logprobs: torch.Tensor) -> None:
        """A context node's last position scores each ending request's first token; a tail's
        positions score the rest of its requests' continuations."""
        at = 0
        for node in batch:
            if not node.ends:
                continue
            width = len(node.tokens) if node.tail else 1
            rows = logprobs[at : at + width]
            at += width
            for i in node.ends:
                cont = self.requests[i][2]
                target = cont[1:] if node.tail else cont[:1]
                t = torch.tensor(target, device=rows.device)
                part = rows.gather(1, t[:, None]).sum()
                greedy = bool((rows.argmax(dim=-1) == t).all())
                self.scores.setdefault(i, []).append(part)
                self.greedy[i] = self.greedy.get(i, True) and greedy
                if node.tail or len(cont) == 1:
                    self.done(i)


def wanted_positions(batch: list[Node]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every scored position, in `Run.score`'s order."""
    rows: list[int] = []
    cols: list[int] = []
    for r, node in enumerate(batch):
        if node.ends:
            span = range(len(node.tokens)) if node.tail else [len(node.tokens) - 1]
            rows += [r] * len(span)
            cols += list(span)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def path_kv(node: Node) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV of every token on the path to `node` (inclusive), `[1, heads, end, dim]` per layer."""
    chain = []
    while node is not None and node.tokens:
        chain.append(node)
        node = node.parent
    chain.reverse()
    if len(chain) == 1:
        return chain[0].kv  # type: ignore[return-value]
    return [
        (
            torch.cat([n.kv[layer][0] for n in chain], dim=2),  # type: ignore[index]
            torch.cat([n.kv[layer][1] for n in chain], dim=2),
        )  # type: ignore[index]
        for layer in range(len(chain[0].kv))  # type: ignore[arg-type]
    ]


def past_cache(batch: list[Node], past: int) -> DynamicCache:
    """The parents' KV, each row's right-aligned at `past` (left padding masked). A plain
    DynamicCache keeps every layer whole: sliding windows come from the masks, which count
    cache positions, and real tokens sit at their unshared distances."""
    parents: dict[int, Node] = {}
    for node in batch:
        parents.setdefault(id(node.parent), node.parent)  # type: ignore[arg-type]
    kvs = {key: path_kv(parent) for key, parent in parents.items()}
    first = next(iter(kvs.values()))
    layers = []
    for layer in range(len(first)):
        pair = []
        for part in (0, 1):
            like = first[layer][part]
            shape = (len(batch), like.shape[1], past, like.shape[3])
            full = like.new_zeros(shape)
            for r, node in enumerate(batch):
                src = kvs[id(node.parent)][layer][part]
                full[r, :, past - src.shape[2] :] = src[0]
            pair.append(full)
        layers.append(tuple(pair))
    return DynamicCache(ddp_cache_data=layers)


def keep_kv(batch: list[Node], cache: Any, past: int) -> None:
    """Copy out each parent row's own positions (the batch tensors are then freed)."""
    for r, node in enumerate(batch):
        if node.kids:
            span = slice(past, past + len(node.tokens))
            node.kv = [
                (layer.keys[r : r + 1, :, span].clone(), layer.values[r : r + 1, :, span].clone())
                for layer in cache.layers
            ]


@contextlib.contextmanager
def gather_logits(model: Any, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Run the output embedding (and whatever the model does after it, e.g. soft-capping) on
    the scored positions only: `logits` comes back as `[1, len(rows), vocab]`."""

    def pick(_module: Any, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[rows.to(hidden.device), cols.to(hidden.device)][None], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()
