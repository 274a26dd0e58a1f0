"""Requests grouped by the context the model sees (lm-eval's left truncation), and evaluation
with shared prefixes scoring exactly as plain HFLM. `PrefixCacheHFLM` itself (each shared
token prefix once) is tested in test_prefix_cache.py."""

from __future__ import annotations

import pytest

from mka_exp.evaluation.hf import evaluate
from mka_exp.evaluation.prefix_tree import group_by_prefix


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
