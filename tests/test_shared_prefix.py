"""SharedPrefixHFLM gives lm-eval's own HFLM answers while running each context once."""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from mka_exp.evaluation.harness import evaluate
from mka_exp.evaluation.shared_prefix import SharedPrefixHFLM, chunk_groups, group_by_prefix
from mka_exp.models.toy import build_random_model


def make_lms(
    loaded, max_length: int | None = None, batch_size: int = 4
) -> tuple[HFLM, SharedPrefixHFLM]:
    lms = tuple(
        cls(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        for cls in (HFLM, SharedPrefixHFLM)
    )
    if max_length is not None:
        for lm in lms:
            lm._max_length = max_length
    return lms  # type: ignore[return-value]


def greedy_continuation(model, context: list[int], n: int) -> list[int]:
    """The n tokens the model itself ranks first after `context`."""
    ids = torch.tensor([context])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(context) :].tolist()


def requests_for(model) -> list:
    """Three contexts x continuations of 1-5 tokens, one greedy, in shuffled order."""
    gen = torch.Generator().manual_seed(0)
    contexts = [torch.randint(5, 200, (n,), generator=gen).tolist() for n in (3, 11, 24)]
    reqs = []
    for c, context in enumerate(contexts):
        for length in (1, 1, 3, 5):
            cont = torch.randint(5, 200, (length,), generator=gen).tolist()
            reqs.append(((f"c{c}", f"{len(reqs)}"), context, cont))
        reqs.append(((f"c{c}", "greedy"), context, greedy_continuation(model, context, 3)))
    return [reqs[i] for i in torch.randperm(len(reqs), generator=gen).tolist()]


@pytest.mark.parametrize("batch_size", [4, 16])  # one context per batch / three, left-padded
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_answers_equal_hflm(model_type, batch_size):
    loaded = build_random_model(model_type, num_layers=2, hidden_size=64, device="cpu")
    reqs = requests_for(loaded.model)
    plain, shared = make_lms(loaded, batch_size=batch_size)
    want = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = shared._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert sum(g for _, g in got) == 3  # the greedy continuations are recognised
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)


def test_left_truncation_equals_hflm(tiny):
    reqs = requests_for(tiny.model)
    plain, shared = make_lms(tiny, max_length=12, batch_size=64)  # cuts 24- and 11-token ones
    want = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = shared._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)


@pytest.mark.parametrize(
    ("batch_size", "forwards", "tokens"),
    [
        (4, 6, (3 + 11 + 24) + 3 * 5 * 4),  # a context, then its 5 tails padded to 4 tokens
        (16, 2, 3 * 24 + 15 * 4),  # all three contexts left-padded to 24, then 15 tails
    ],
)
def test_each_context_runs_once(tiny, batch_size, forwards, tokens):
    reqs = requests_for(tiny.model)
    seen: list[int] = []
    hook = tiny.model.model.embed_tokens.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].numel())
    )
    try:
        make_lms(tiny, batch_size=batch_size)[1]._loglikelihood_tokens(reqs, disable_tqdm=True)
    finally:
        hook.remove()
    assert (len(seen), sum(seen)) == (forwards, tokens)


def test_chunks_hold_at_most_rows_longest_first():
    groups = {(1,): [0, 1], (1, 2, 3): [2, 3, 4], (1, 2): [5], (4, 5, 6, 7): [6, 7, 8, 9, 10]}
    chunks = chunk_groups(groups, rows=4)
    assert chunks == [[(4, 5, 6, 7)], [(1, 2, 3), (1, 2)], [(1,)]]


def test_groups_follow_truncation():
    reqs = [(("a", "b"), [1, 2, 3, 4], [5]), (("a", "c"), [1, 2, 3, 4], [6, 7])]
    assert group_by_prefix(reqs, max_length=10) == {(1, 2, 3, 4): [0, 1]}
    # max_length 4: the 2-token continuation keeps 3 context tokens, the 1-token one keeps 4
    assert group_by_prefix(reqs, max_length=4) == {(1, 2, 3, 4): [0], (2, 3, 4): [1]}
    with pytest.raises(ValueError, match="request 0.*continuation"):
        group_by_prefix([(("a", ""), [1], [])], max_length=4)


def test_evaluate_scores_equal_plain_hflm(tiny, data_root):
    kwargs = dict(tasks=["piqa", "race", "boolq"], limit=6, data_root=data_root)
    shared = evaluate(tiny.model, tiny.tokenizer, share_prefix=True, **kwargs)
    plain = evaluate(tiny.model, tiny.tokenizer, share_prefix=False, **kwargs)
    assert {"piqa/acc", "race/acc", "boolq/acc"} <= set(shared)
    assert shared == pytest.approx(plain, abs=1e-9)
