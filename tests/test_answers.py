"""Answers kept as they come (`eval.answer_cache`): an interrupted evaluation resumes where it
stopped and records what an uninterrupted one records; another model, or the same one scored
by other settings, never reads them; a damaged file is set aside, not believed."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from mka_exp.evaluation.answers import answer_key, readable_count
from mka_exp.evaluation.hf import HFEvaluation

TASKS = dict(tasks=["mmlu_anatomy", "piqa"], limit=3, num_fewshot={"mmlu_anatomy": 1})


class Interrupted(Exception):
    """Stands for a kill: raised by the cache hook after some answers are on disk."""


def evaluation(data_root, cache=None, **settings):
    return HFEvaluation(**TASKS, data_root=str(data_root), batch_size=2, answer_cache=cache,
                        **settings)  # fmt: skip


def run(backend, loaded):
    metrics, rows = backend.evaluate(loaded.model, loaded.tokenizer)
    return metrics, rows, backend.last_lm.stats


def assert_same(got, want):
    """Same metrics and predictions; log-likelihoods to float tolerance (a resumed run batches
    its remaining requests differently)."""
    assert got[0] == pytest.approx(want[0], abs=1e-9)
    assert got[1]["pred"].tolist() == want[1]["pred"].tolist()
    for a, b in zip(got[1]["choice_ll"], want[1]["choice_ll"], strict=True):
        assert list(a) == pytest.approx(list(b), abs=1e-4)


@contextlib.contextmanager
def interrupted_at(model, forward: int):
    """The model raises on its `forward`-th call: mid-evaluation, as a kill would stop it."""
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == forward:
            raise Interrupted

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_an_interrupted_evaluation_resumes_where_it_stopped(tiny, data_root, tmp_path):
    fresh = run(evaluation(data_root), tiny)
    total, forwards = fresh[2]["requests"], fresh[2]["forwards"]
    cache = str(tmp_path / "answers")
    with interrupted_at(tiny.model, forwards), pytest.raises(Interrupted):  # the last forward
        run(evaluation(data_root, cache), tiny)
    [db] = (tmp_path / "answers").glob("*.db")
    kept = readable_count(db)
    assert 0 < kept < total  # each answer went to disk when scored, not at the end
    resumed = run(evaluation(data_root, cache), tiny)
    assert resumed[2]["requests"] == total - kept  # only the unanswered ones reach the model
    assert_same(resumed, fresh)
    again = run(evaluation(data_root, cache), tiny)
    assert again[2]["requests"] == 0  # the same model again: every answer read back
    assert again[0] == resumed[0]
    assert again[1]["choice_ll"].tolist() == resumed[1]["choice_ll"].tolist()


def test_another_model_or_other_scoring_never_reads_the_answers(tiny, data_root, tmp_path):
    cache = str(tmp_path / "answers")
    base = run(evaluation(data_root, cache), tiny)
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one number
    fresh = run(evaluation(data_root), other)
    got = run(evaluation(data_root, cache), other)
    assert got[2]["requests"] == fresh[2]["requests"] > 0  # none read from the first model's
    assert_same(got, fresh)
    plain = evaluation(data_root, cache, share_prefix=False)  # lm-eval's own HFLM scores
    assert_same(plain.evaluate(tiny.model, tiny.tokenizer), base)
    assert len(list((tmp_path / "answers").glob("*.db"))) == 3  # a file per model and scoring


def test_the_key_covers_model_tokenizer_and_settings(tiny):
    key = answer_key(tiny.model, tiny.tokenizer, {"batch_size": 2})
    assert key == answer_key(tiny.model, tiny.tokenizer, {"batch_size": 2})
    assert key != answer_key(tiny.model, tiny.tokenizer, {"batch_size": 4})
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.padding_side = "left" if tokenizer.padding_side == "right" else "right"
    assert key != answer_key(tiny.model, tokenizer, {"batch_size": 2})
    model = copy.deepcopy(tiny.model)
    model.config.rms_norm_eps *= 2  # no tensor changes, the forward does
    assert key != answer_key(model, tiny.tokenizer, {"batch_size": 2})


def test_a_damaged_file_is_set_aside_and_the_answers_recomputed(tiny, data_root, tmp_path):
    cache = tmp_path / "answers"
    want = run(evaluation(data_root, str(cache)), tiny)
    [db] = cache.glob("*.db")
    db.write_bytes(b"SQLite format 3\0" + b"\x07" * 4000)  # a header, then garbage
    got = run(evaluation(data_root, str(cache)), tiny)
    assert got[2]["requests"] == want[2]["requests"]  # nothing believed from the damaged file
    assert_same(got, want)
    assert (cache / f"{db.name}.damaged").exists() and readable_count(db) > 0


def test_answer_cache_is_checked_before_the_model_and_never_hashed(tmp_path, data_root, no_model):
    from omegaconf import OmegaConf

    from mka_exp.checks import ConfigError
    from mka_exp.preflight import check_config
    from mka_exp.results import records
    from tests.helpers import compose_config

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError) as err:
        check_config(
            compose_config([f"eval.answer_cache={tmp_path / 'a_file'}"], tmp_path, data_root)
        )
    [problem] = err.value.problems
    assert problem.startswith(f"eval.answer_cache='{tmp_path / 'a_file'}': allowed null (off)")
    on = compose_config([], tmp_path, data_root)
    assert on.eval.answer_cache == str(tmp_path / "cache" / "answers")  # on by default
    off = compose_config(["eval.answer_cache=null"], tmp_path, data_root)
    hashes = {records.config_hash(OmegaConf.to_container(c, resolve=True)) for c in (on, off)}
    assert len(hashes) == 1
