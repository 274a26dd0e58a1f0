"""lm-eval on the in-memory tiny model, reading the offline mirror: metric keys, MMLU group and
macro scores, routing to the given data root, and argument errors."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest

from mka_exp.data import MMLU_SUBJECTS
from mka_exp.evaluation.checks import check_limit, check_sample_seed
from mka_exp.evaluation.harness import draw_examples, flatten_results
from mka_exp.evaluation.hf import HFEvaluation, evaluate

PIQA = "baber/piqa/default/validation.jsonl"


def assert_scores(scores: dict[str, float]) -> None:
    assert scores, "no metrics"
    for key, value in scores.items():
        assert math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)


def test_piqa_and_boolq_keys(tiny, data_root):
    scores = evaluate(tiny.model, tiny.tokenizer, ["piqa", "boolq"], limit=8, data_root=data_root)
    assert {"piqa/acc", "piqa/acc_norm", "piqa/acc_stderr", "boolq/acc"} <= set(scores)
    assert not any(k.startswith("boolq/acc_norm") for k in scores)  # boolq has acc only
    assert_scores(scores)


def test_mmlu_group_macro_and_subjects(tiny, data_root):
    scores = evaluate(
        tiny.model, tiny.tokenizer, ["mmlu"], limit=1, num_fewshot={"mmlu": 1}, data_root=data_root
    )
    subjects = {k: v for k, v in scores.items() if k.startswith("mmlu_") and k.endswith("/acc")}
    assert set(subjects) == {f"mmlu_{s}/acc" for s in MMLU_SUBJECTS}
    assert scores["mmlu/acc_macro"] == pytest.approx(np.mean(list(subjects.values())))
    # One example per subject: lm-eval's size-weighted score equals the macro average.
    assert scores["mmlu/acc"] == pytest.approx(scores["mmlu/acc_macro"])
    assert not any(k.startswith("mmlu_stem") for k in scores)  # categories left out
    assert_scores(scores)


def test_race_and_hellaswag_load_from_mirror(tiny, data_root):
    scores = evaluate(
        tiny.model, tiny.tokenizer, ["race", "hellaswag"], limit=4, data_root=data_root
    )
    assert {"race/acc", "hellaswag/acc", "hellaswag/acc_norm"} <= set(scores)
    assert_scores(scores)


def test_lm_eval_task_names_pass_through(tiny, data_root):
    scores = evaluate(tiny.model, tiny.tokenizer, ["mmlu_anatomy"], limit=2, data_root=data_root)
    assert "mmlu_anatomy/acc" in scores


def test_data_comes_from_the_given_root(tiny, data_root, tmp_path):
    """A copy of piqa's first 9 rows with every label flipped scores exactly 1 - acc: with 9
    two-choice examples acc != 1 - acc, so this cannot pass if the real mirror were read."""
    rows = [json.loads(line) for line in (data_root / PIQA).read_text().splitlines()[:9]]
    flipped = tmp_path / PIQA
    flipped.parent.mkdir(parents=True)
    flipped.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in rows))
    load_dataset = datasets.load_dataset

    real = evaluate(tiny.model, tiny.tokenizer, ["piqa"], limit=9, data_root=data_root)
    copy = evaluate(tiny.model, tiny.tokenizer, ["piqa"], limit=9, data_root=str(tmp_path))
    assert copy["piqa/acc"] == pytest.approx(1 - real["piqa/acc"])
    assert copy["piqa/acc"] != pytest.approx(real["piqa/acc"])
    assert datasets.load_dataset is load_dataset  # routing undone


def test_fraction_limit(tiny, data_root):
    backend = HFEvaluation(tasks=["piqa"], limit=0.002, data_root=data_root)
    raw = backend.run(tiny.model, tiny.tokenizer)[1]
    assert raw["n-samples"]["piqa"]["effective"] == math.ceil(1838 * 0.002)


def test_fewshot_without_train_split_is_explained(tiny, data_root):
    with pytest.raises(ValueError, match="few-shot.*piqa"):
        evaluate(tiny.model, tiny.tokenizer, ["piqa"], limit=2, num_fewshot={"piqa": 1},
                 data_root=data_root)  # fmt: skip


def test_unknown_task_suggests_close_match(tiny, data_root):
    with pytest.raises(ValueError, match="hellaswg.*hellaswag"):
        evaluate(tiny.model, tiny.tokenizer, ["piqa", "hellaswg"], data_root=data_root)
    with pytest.raises(ValueError, match="mmlux"):
        evaluate(
            tiny.model, tiny.tokenizer, ["piqa"], num_fewshot={"mmlux": 5}, data_root=data_root
        )


@pytest.mark.parametrize("limit", [0, -3, 0.0, 1.5, float("nan"), True])
def test_bad_limit(tiny, data_root, limit):
    with pytest.raises(ValueError, match=f"limit={limit!r}"):
        evaluate(tiny.model, tiny.tokenizer, ["piqa"], limit=limit, data_root=data_root)


def test_limit_meaning():
    assert check_limit(None) is None
    assert check_limit(1.0) is None  # all, not lm-eval's "1 example"
    assert check_limit(0.5) == 0.5
    assert check_limit(1) == 1


def test_missing_data_root(tiny, tmp_path):
    missing = tmp_path / "no_such_mirror"
    with pytest.raises(FileNotFoundError, match="no_such_mirror"):
        evaluate(tiny.model, tiny.tokenizer, ["piqa"], data_root=str(missing))


def test_no_tasks_is_empty(tiny):
    assert evaluate(tiny.model, tiny.tokenizer, []) == {}


def test_flatten_results():
    """N/A and non-metric fields dropped, filters kept, intermediate groups left out."""
    results = {
        "results": {
            "grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 3},
            "grp_a": {"acc,none": 0.4},
            "t1": {"acc,none": 1.0, "acc_norm,none": 0.0},
            "t2": {"acc,none": 0.0, "acc_norm,none": 1.0},
            "t3": {"acc,none": 0.5, "exact_match,strict-match": 0.25},
        },
        "configs": {"t1": {}, "t2": {}, "t3": {}},
        "group_subtasks": {"grp": ["grp_a", "t3"], "grp_a": ["t1", "t2"]},
    }
    flat = flatten_results(results, {"grp": "ours"})
    assert flat == {
        "ours/acc": 0.5,
        "ours/acc_macro": 0.5,
        "t1/acc": 1.0,
        "t1/acc_norm": 0.0,
        "t2/acc": 0.0,
        "t2/acc_norm": 1.0,
        "t3/acc": 0.5,
        "t3/exact_match,strict-match": 0.25,
    }


def test_tasks_are_built_once_and_prompt_alike(tiny, data_root, monkeypatch):
    """A second call reuses the built tasks (no data read) and sends the very same prompts,
    few-shot examples included, as the first."""
    import mka_exp.evaluation.harness as evaluation

    monkeypatch.setattr(evaluation, "BUILT_TASKS", {})
    builds = []
    load = evaluation.load_tasks
    monkeypatch.setattr(evaluation, "load_tasks", lambda *a: builds.append(a) or load(*a))
    kwargs = dict(limit=3, num_fewshot={"mmlu_anatomy": 2}, data_root=data_root)
    backend = HFEvaluation(tasks=["mmlu_anatomy"], **kwargs)
    runs = [backend.run(tiny.model, tiny.tokenizer, log_samples=True)[1] for _ in "ab"]
    assert len(builds) == 1
    prompts = [[s["arguments"] for s in run["samples"]["mmlu_anatomy"]] for run in runs]
    assert prompts[0] == prompts[1] and len(prompts[0]) == 3
    assert runs[0]["results"] == runs[1]["results"]
    (task_dict,) = evaluation.BUILT_TASKS.values()
    tasks = list(evaluation.task_objects(task_dict))
    assert tasks and all(t.eval_docs is t.eval_docs for t in tasks)  # mapped once, kept


@pytest.mark.parametrize(
    ("seed", "limit", "wrong"),
    [
        (-1, 10, "-1"),
        (1.5, 10, "1.5"),
        (True, 10, "True"),
        ("3", 10, "'3'"),
        (3, None, "None"),
        (3, 0.5, "0.5"),
    ],
)
def test_bad_sample_seed_is_one_line(seed, limit, wrong):
    with pytest.raises(ValueError, match=r"eval\.sample_seed=") as err:
        check_sample_seed(seed, limit)
    assert wrong in str(err.value) and "\n" not in str(err.value)


def test_good_sample_seeds_pass():
    for seed, limit in [(None, None), (None, 0.5), (0, 10), (7, 1)]:
        check_sample_seed(seed, limit)


def test_bad_sample_seed_stops_before_the_model_loads(tmp_path, data_root, monkeypatch):
    from mka_exp import pipeline
    from tests.helpers import compose_config

    monkeypatch.setattr(pipeline, "load_session", lambda *a: pytest.fail("model loaded"))
    cfg = compose_config(["eval.sample_seed=3", "eval.limit=null"], tmp_path, data_root)
    with pytest.raises(ValueError, match=r"eval\.sample_seed=3 .*eval\.limit=None"):
        pipeline.run(cfg)


@pytest.fixture
def piqa_mmlu(data_root):
    from mka_exp.data import offline_datasets
    from mka_exp.evaluation.harness import built_tasks

    with offline_datasets(data_root):
        return built_tasks(["piqa", "mmlu"], {}, 1234, data_root)


def test_draw_is_seeded_per_leaf_task(piqa_mmlu):
    draw = draw_examples(piqa_mmlu, 5, 0)
    assert set(draw) == set(piqa_mmlu["tasks"]) and len(draw) == 1 + len(MMLU_SUBJECTS)
    for name, indices in draw.items():
        total = len(piqa_mmlu["tasks"][name].eval_docs)
        assert indices == sorted(set(indices)) and len(indices) == 5 and indices[-1] < total
    assert draw == draw_examples(piqa_mmlu, 5, 0)
    other = draw_examples(piqa_mmlu, 5, 1)
    assert sum(draw[n] != other[n] for n in draw) == len(draw)  # every task draws anew
    assert draw["piqa"] != list(range(5))
    alone = {"tasks": {"piqa": piqa_mmlu["tasks"]["piqa"]}}
    assert draw_examples(alone, 5, 0)["piqa"] == draw["piqa"]  # not shaped by the other tasks
    small = draw_examples(alone, 10**6, 0)["piqa"]
    assert small == list(range(len(piqa_mmlu["tasks"]["piqa"].eval_docs)))  # limit >= size: all


def test_seeded_runs_evaluate_the_drawn_examples(tiny, data_root, piqa_mmlu):
    """Two runs with one seed score the same drawn examples, and every row's doc_hash is the hash
    of the document at its doc_id (lm-eval mapped the draw back correctly)."""
    from lm_eval.utils import handle_non_serializable, hash_string

    from mka_exp.results import samples

    kwargs = dict(tasks=["piqa", "mmlu_anatomy"], limit=4, data_root=data_root, sample_seed=11)
    (flat, one), (_, two) = (
        HFEvaluation(**kwargs).evaluate(tiny.model, tiny.tokenizer) for _ in "ab"
    )
    cols = ["subtask", "doc_id", "doc_hash", "prompt_hash", "target", "choice_ll"]
    assert one[cols].equals(two[cols])
    draw = draw_examples(piqa_mmlu, 4, 11)
    for subtask in ("piqa", "mmlu_anatomy"):
        assert one[one["subtask"] == subtask]["doc_id"].tolist() == draw[subtask]
    docs = {name: task.eval_docs for name, task in piqa_mmlu["tasks"].items()}
    for row in one.to_dict("records"):
        doc = docs[row["subtask"]][row["doc_id"]]
        text = json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False)
        assert row["doc_hash"] == hash_string(text)[:16]
    assert samples.aggregate(one)["piqa/acc"] == pytest.approx(flat["piqa/acc"], abs=1e-12)
    first = HFEvaluation(**{**kwargs, "sample_seed": None}).evaluate(tiny.model, tiny.tokenizer)[1]
    assert first[first["subtask"] == "piqa"]["doc_id"].tolist() == [0, 1, 2, 3]
    assert samples.examples_digest({"piqa": draw["piqa"]}) != samples.examples_digest(
        {"piqa": [0, 1, 2, 3]}
    )


def test_sample_seed_null_keeps_every_committed_evidence_hash(data_root):
    """The key arrived after the evidence: null must leave each record's hash its own key (and a
    seeded record's seed is in its hash)."""
    from pathlib import Path

    from mka_exp.results.records import config_hash

    paths = sorted(Path(__file__).parents[1].glob("docs/evidence/*/records/*.json"))
    assert paths
    for path in paths:
        record = json.loads(path.read_text())
        config = {**record["config"], "data_root": str(data_root)}  # the same mirror, here
        seed = config["eval"].get("sample_seed")  # a seeded draw (issue 28's records): its own
        config["eval"] = {**config["eval"], "sample_seed": seed}
        assert config_hash(config) == record["config_hash"], path.name
        other = {**config, "eval": {**config["eval"], "sample_seed": 0 if seed is None else None}}
        assert config_hash(other) != record["config_hash"]


def test_mmlu_val_evaluates_validation_questions(tiny, data_root):
    """`eval.tasks=[mmlu_val]`: lm-eval's MMLU subjects read from the validation split, offline,
    with per-example rows like mmlu's, under names that say so; never the test questions."""
    from mka_exp.data import load_split
    from mka_exp.evaluation.harness import resolve_tasks

    assert resolve_tasks(["mmlu_val"]) == {"mmlu_val": "mmlu_val"}
    kwargs = dict(tasks=["mmlu_val"], limit=2, data_root=data_root, sample_seed=5)
    kwargs["num_fewshot"] = {"mmlu_val": 0}
    backend = HFEvaluation(**kwargs)
    backend.check_data()
    flat, rows = backend.evaluate(tiny.model, tiny.tokenizer)
    assert {"mmlu_val/acc", "mmlu_val/acc_macro", "mmlu_val_anatomy/acc"} <= set(flat)
    assert not any(key.startswith("mmlu/") for key in flat)
    assert set(rows["task"]) == {"mmlu_val"} and rows["subtask"].nunique() == len(MMLU_SUBJECTS)
    assert len(rows) == 2 * len(MMLU_SUBJECTS) and rows["choice_ll"].notna().all()
    anatomy = rows[rows["subtask"] == "mmlu_val_anatomy"]
    validation = load_split("cais/mmlu", "anatomy", "validation", data_root)
    test = {row["question"] for row in load_split("cais/mmlu", "anatomy", "test", data_root)}
    assert anatomy["doc_id"].max() < len(validation)
    asked = [validation[i]["question"] for i in anatomy["doc_id"]]
    assert not set(asked) & test  # validation questions, none of the test split's
    assert anatomy["target"].tolist() == [validation[i]["answer"] for i in anatomy["doc_id"]]
