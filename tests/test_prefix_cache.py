"""PrefixCacheHFLM gives lm-eval's own HFLM answers while running each shared prefix once."""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoConfig, AutoModelForCausalLM

from mka_exp.evaluation.checks import check_prefix_cache
from mka_exp.evaluation.hf import evaluate
from mka_exp.evaluation.prefix_cache import PrefixCacheHFLM
from mka_exp.evaluation.prefix_tree import build_tree, tree_tokens
from mka_exp.models.loading import LoadedModel
from mka_exp.models.toy import build_random_model, train_tokenizer

HEADER = list(range(5, 10))  # 5 tokens shared by both "subjects": below min_shared, recomputed


def tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(10, 200, (n,), generator=gen).tolist()


def few_shot_requests(model) -> list:
    """Two few-shot prefixes (HEADER + 25 and HEADER + 9 tokens) under 2-3 questions each,
    four answers per question: one-token answers (MMLU), answers of 2-4 tokens, a greedy one;
    a context that is a prefix of another; a duplicate request; shuffled."""
    gen = torch.Generator().manual_seed(0)
    prefixes = [HEADER + tokens(gen, 25), HEADER + tokens(gen, 9)]
    contexts = [
        p + tokens(gen, n)
        for p, lengths in zip(prefixes, [(4, 7, 3), (6, 2)], strict=True)
        for n in lengths
    ]
    contexts.append(contexts[0] + tokens(gen, 3))  # extends another context
    reqs = []
    for c, context in enumerate(contexts):
        lengths = (1, 1, 1, 1) if c % 2 else (1, 2, 4, 3)
        for length in lengths:
            reqs.append(((f"c{c}", str(len(reqs))), context, tokens(gen, length)))
        out = model.generate(
            torch.tensor([context]), max_new_tokens=2, min_new_tokens=2, do_sample=False
        )
        reqs.append(((f"c{c}", "greedy"), context, out[0, len(context) :].tolist()))
    reqs.append(reqs[3])
    return [reqs[i] for i in torch.randperm(len(reqs), generator=gen).tolist()]


def build(model_type: str, layers: int = 2) -> LoadedModel:
    """Random model (two layers by default); Qwen2 with non-zero attention biases, Gemma3 with
    an 8-token sliding window (shorter than the prompts) on its even layers, full attention on
    the others."""
    if model_type == "gemma3_text":
        tokenizer = train_tokenizer()
        types = ["sliding_attention", "full_attention"] * (layers // 2)
        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            sliding_window=8, layer_types=types, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        return LoadedModel(model, tokenizer, "gemma3_sliding")
    loaded = build_random_model(model_type, num_layers=layers, hidden_size=64, device="cpu")
    if model_type == "qwen2":
        gen = torch.Generator().manual_seed(1)
        for name, param in loaded.model.named_parameters():
            if name.endswith("bias"):
                param.data = torch.randn(param.shape, generator=gen) * 0.5
    return loaded


def make_lms(loaded, max_length=None, batch_size=4, **cache):
    plain = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    cached = PrefixCacheHFLM(
        pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, **cache
    )
    if max_length is not None:
        plain._max_length = cached._max_length = max_length
    return plain, cached


def assert_same_answers(got, want):
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)


@pytest.mark.parametrize("batch_size", [3, 16])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_answers_equal_hflm(model_type, batch_size):
    loaded = build(model_type)
    reqs = few_shot_requests(loaded.model)
    plain, cached = make_lms(loaded, batch_size=batch_size, min_shared=8)
    want = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = cached._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert_same_answers(got, want)
    assert sum(g for _, g in got) >= 6  # the greedy continuations are recognised
    assert cached.stats["fallback_requests"] == 0


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_left_truncation_equals_hflm(model_type):
    """max_length 24 cuts the long contexts from the left, differently for each continuation
    length; a 24-token continuation leaves one token of its context. A 25-token one would leave
    none (its first token unscoreable): HFLM fails on a bare AssertionError, we name the request."""
    loaded = build(model_type)
    reqs = few_shot_requests(loaded.model)
    gen = torch.Generator().manual_seed(2)
    reqs.append((("long", "cont"), reqs[0][1], tokens(gen, 24)))
    plain, cached = make_lms(loaded, max_length=24, min_shared=2)
    assert_same_answers(
        cached._loglikelihood_tokens(reqs, disable_tqdm=True),
        plain._loglikelihood_tokens(reqs, disable_tqdm=True),
    )
    too_long = [(("longer", "cont"), reqs[0][1], tokens(gen, 25))]
    with pytest.raises(
        ValueError, match=r"request 0: context \(\d+ tokens\) and continuation \(25\)"
    ):
        cached._loglikelihood_tokens(too_long, disable_tqdm=True)


def count_embedded(model, lm, reqs) -> tuple[int, int]:
    """(forwards, tokens incl. padding) that reach the model's embedding."""
    seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].numel())
    )
    try:
        lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    finally:
        hook.remove()
    return len(seen), sum(seen)


def test_each_shared_prefix_runs_once(tiny):
    """Subject prefix P (40 tokens) under 3 questions (7, 8, 9 tokens), 4 one-token answers
    each, plus one 3-token answer: P once, the questions once, one tail of 2 tokens."""
    gen = torch.Generator().manual_seed(3)
    prefix = tokens(gen, 40)
    reqs = []
    for n in (7, 8, 9):
        context = prefix + tokens(gen, n)
        reqs += [(("q", str(len(reqs))), context, tokens(gen, 1)) for _ in range(4)]
    reqs.append((("q", "long"), reqs[0][1], tokens(gen, 3)))
    _, cached = make_lms(tiny, batch_size=8)
    forwards, seen = count_embedded(tiny.model, cached, reqs)
    # level 1: P; level 2: the 3 questions right-padded to 9; level 3: the tail
    assert (forwards, seen) == (3, 40 + 3 * 9 + 2)
    assert cached.stats["run_tokens"] == 40 + 7 + 8 + 9 + 2
    assert cached.stats["requested_tokens"] == 12 * 40 + 4 * (7 + 8 + 9) + 40 + 7 + 2


def test_tree_pushes_short_shared_runs_down():
    reqs = [
        (("a", ""), [1, 2, 3, 4, 5, 6], [9]),
        (("b", ""), [1, 2, 3, 4, 7, 8], [9]),
        (("c", ""), [1, 2, 9], [9, 9, 9]),
    ]
    root, where = build_tree(reqs, max_length=100, min_shared=1)
    assert [kid.tokens for kid in root.kids] == [[1, 2]]
    assert tree_tokens(root) == 2 + 1 + 2 + 2 + 2 + 2  # [1,2] [9] [3,4] [5,6] [7,8], tail [9,9]
    root, where = build_tree(reqs, max_length=100, min_shared=3)  # [1,2] too short to split off
    assert sorted(kid.tokens for kid in root.kids) == [[1, 2, 3, 4], [1, 2, 9]]
    assert where[0].tokens == [5, 6] and where[0].parent.tokens == [1, 2, 3, 4]
    assert [kid.tokens for kid in where[2].kids] == [[9, 9]]  # the tail


@pytest.mark.parametrize("cap", [30, 50])  # below one prefix / fits prefixes, not all rows
def test_small_cap_falls_back_to_same_answers(tiny, cap):
    reqs = few_shot_requests(tiny.model)
    plain, cached = make_lms(tiny, batch_size=16, cache_tokens=cap, min_shared=8)
    assert_same_answers(
        cached._loglikelihood_tokens(reqs, disable_tqdm=True),
        plain._loglikelihood_tokens(reqs, disable_tqdm=True),
    )
    longest = max(len(c) + len(t) - 1 for _, c, t in reqs)
    assert (cached.stats["fallback_requests"] > 0) == (longest > cap)


@pytest.mark.parametrize(
    ("cap", "shared", "message"),
    [
        (0, 16, "eval.prefix_cache_tokens=0: allowed an integer >= 1"),
        (-5, 16, "eval.prefix_cache_tokens=-5: allowed an integer >= 1"),
        (16, 0, "eval.prefix_min_shared=0: allowed an integer >= 1"),
        (16, 2.5, "eval.prefix_min_shared=2.5: allowed an integer >= 1"),
    ],
)
def test_bad_options_one_line(cap, shared, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        check_prefix_cache(cap, shared)


def test_evaluate_equal_to_plain_hflm(tiny, data_root):
    """Whole evaluate() calls: 2-shot MMLU on two subjects, and the 0-shot tasks."""
    kwargs = dict(
        tasks=["mmlu_anatomy", "mmlu_astronomy", "piqa", "race", "boolq"],
        limit=4,
        num_fewshot={"mmlu_anatomy": 2, "mmlu_astronomy": 2},
        data_root=data_root,
    )
    cached = evaluate(tiny.model, tiny.tokenizer, share_prefix=True, **kwargs)
    plain = evaluate(tiny.model, tiny.tokenizer, share_prefix=False, **kwargs)
    assert {"mmlu_anatomy/acc", "piqa/acc", "race/acc", "boolq/acc"} <= set(cached)
    assert cached == pytest.approx(plain, abs=1e-9)


def test_config_checks_before_the_model_loads(tmp_path, data_root):
    """Both bad values in one run: one line each; the keys never change a record's hash."""
    from omegaconf import OmegaConf

    from mka_exp.checks import ConfigError
    from mka_exp.preflight import check_config
    from mka_exp.results import records as results
    from tests.helpers import compose_config

    bad = ["eval.prefix_cache_tokens=0", "eval.prefix_min_shared=0"]
    with pytest.raises(ConfigError) as err:
        check_config(compose_config(bad, tmp_path, data_root))
    assert err.value.problems == [
        "eval.prefix_cache_tokens=0: allowed an integer >= 1",
        "eval.prefix_min_shared=0: allowed an integer >= 1",
    ]
    good = compose_config([], tmp_path, data_root)
    other = compose_config(
        ["eval.prefix_cache_tokens=99", "eval.prefix_min_shared=3"], tmp_path, data_root
    )
    check_config(other)
    hashes = {results.config_hash(OmegaConf.to_container(c, resolve=True)) for c in (good, other)}
    assert len(hashes) == 1
