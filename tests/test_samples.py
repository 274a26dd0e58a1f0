"""Per-example records: written beside every record (each curve point its own file), atomically,
readable by the group, and they reproduce the record's aggregated metrics exactly."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat

import numpy as np
import pandas as pd
import pytest

from mka_exp import pipeline
from mka_exp.results import samples
from mka_exp.results.records import load_record
from tests.helpers import compose_config

TASKS = ["eval.tasks=[piqa,mmlu]", "eval.limit=3", "eval.num_fewshot={}"]


@pytest.fixture(scope="module")
def curve(tmp_path_factory, data_root):
    """A two-point reverse_prune curve on the tiny model, piqa + MMLU (3 per subject), run under
    umask 027 so the files' modes show whether the umask was honoured."""
    root = tmp_path_factory.mktemp("samples")
    cfg = compose_config(["method=reverse_prune", "curve=[0.25,0.5]", *TASKS], root, data_root)
    old = os.umask(0o027)
    try:
        last = pipeline.run(cfg)
    finally:
        os.umask(old)
    records = [json.loads(p.read_text()) for p in sorted((root / "records").glob("*.json"))]
    return root, records, last


def test_every_point_has_its_own_referenced_file(curve):
    root, records, last = curve
    assert len(records) == 2
    paths = {r["samples"]["path"] for r in records}
    assert paths == {f"records/{r['config_hash']}.samples.jsonl.gz" for r in records}
    assert load_record(root, last["config_hash"])["samples"] == last["samples"]
    for record in records:
        frame = samples.read_samples(root, record)
        assert len(frame) == record["samples"]["rows"] == 3 + 57 * 3
        assert list(frame.columns) == list(samples.COLUMNS)
        assert not list(root.rglob("*.tmp"))


def test_files_are_written_with_the_umask_mode(curve):
    root, records, _ = curve
    for record in records:
        mode = stat.S_IMODE((root / record["samples"]["path"]).stat().st_mode)
        assert mode == 0o640, oct(mode)


def test_per_example_records_reproduce_the_metrics(curve):
    root, records, _ = curve
    for record in records:
        frame = samples.read_samples(root, record)
        recomputed = samples.aggregate(frame)
        metrics = record["metrics"]
        keys = ["piqa/acc", "piqa/acc_norm", "mmlu/acc", "mmlu/acc_macro", "mmlu_anatomy/acc"]
        assert set(keys) <= set(recomputed)
        for key in recomputed:  # every metric the rows give, MMLU's 57 subjects included
            assert recomputed[key] == pytest.approx(metrics[key], abs=1e-12), key
        subjects = frame[frame["task"] == "mmlu"]["subtask"]
        assert subjects.nunique() == 57 and subjects.str.startswith("mmlu_").all()


def test_pred_is_the_answer_acc_scores(curve):
    root, records, _ = curve
    frame = samples.read_samples(root, records[0])
    assert frame["pred"].notna().all()
    assert ((frame["pred"] == frame["target"]).astype(float) == frame["acc"]).all()
    mmlu = frame[frame["task"] == "mmlu"]
    assert mmlu["acc_norm"].isna().all() and frame["doc_hash"].str.len().eq(16).all()


def test_curve_points_differ_but_share_examples(curve):
    root, records, _ = curve
    first, second = (samples.read_samples(root, r) for r in records)
    key = ["task", "subtask", "doc_id", "doc_hash", "prompt_hash", "target"]
    pd.testing.assert_frame_equal(first[key], second[key])


def test_equal_rows_give_an_equal_file(tmp_path):
    frame = pd.DataFrame(
        [
            [
                "piqa",
                "piqa",
                0,
                "ab" * 8,
                "cd" * 8,
                1,
                1,
                1.0,
                float("nan"),
                "none",
                [-2.5, -1.0],
                [3, 4],
            ]
        ],
        columns=samples.COLUMNS,
    )
    one = samples.write_samples(tmp_path / "a", "k", frame)
    two = samples.write_samples(tmp_path / "b", "k", frame)
    assert one == two and one["rows"] == 1
    line = gzip.decompress((tmp_path / "a" / one["path"]).read_bytes()).decode()
    assert json.loads(line)["acc_norm"] is None


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_damaged_file_is_one_clear_error(curve, damage, tmp_path):
    root, records, _ = curve
    record = dict(records[0])
    target = tmp_path / record["samples"]["path"]
    target.parent.mkdir(parents=True)
    if damage == "corrupt":
        blob = (root / record["samples"]["path"]).read_bytes()
        target.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(samples.SamplesError, match=f"{damage}|sha256") as err:
        samples.read_samples(tmp_path, record)
    assert record["config_hash"] in str(err.value) and "\n" not in str(err.value)


def test_a_record_without_samples_reads_as_none(tmp_path):
    assert samples.read_samples(tmp_path, {"config_hash": "x"}) is None


@pytest.fixture(scope="module")
def logged(data_root):
    """piqa + hellaswag (5 each) on a tiny model through the backend's `evaluate`, with the raw
    samples lm-eval logged in that same evaluation."""
    from mka_exp.evaluation.hf import HFEvaluation
    from mka_exp.models.toy import build_random_model

    tiny = build_random_model("llama", num_layers=2, hidden_size=64, device="cpu")
    raw = {}

    def spy(*args, **kwargs):
        raw["results"], task_dict = run(*args, **kwargs)
        return raw["results"], task_dict

    backend = HFEvaluation(tasks=["piqa", "hellaswag"], limit=5, data_root=data_root)
    run = backend.lm_eval_run
    backend.lm_eval_run = spy
    _, frame = backend.evaluate(tiny.model, tiny.tokenizer)
    by_key = {(t, s["doc_id"]): s for t, rows in raw["results"]["samples"].items() for s in rows}
    return frame, by_key


def test_choice_ll_is_what_lm_eval_logged_and_acc_compares(logged):
    frame, by_key = logged
    assert len(frame) == 10
    for row in frame.to_dict("records"):
        sample = by_key[(row["subtask"], row["doc_id"])]
        assert row["choice_ll"] == [float(ll) for ll, _ in sample["filtered_resps"]]
        assert row["choice_ll"] == [float(r[0][0]) for r in sample["resps"]]
        assert int(np.argmax(row["choice_ll"])) == row["pred"]
        assert float(row["pred"] == row["target"]) == row["acc"] == sample["acc"]


def test_choice_len_gives_lm_evals_acc_norm(logged):
    frame, by_key = logged
    for row in frame.to_dict("records"):
        normed = np.array(row["choice_ll"]) / np.array(row["choice_len"])
        assert float(int(np.argmax(normed)) == row["target"]) == row["acc_norm"]
    piqa = frame[frame["task"] == "piqa"].to_dict("records")
    for row in piqa:  # characters of each solution string, no target delimiter
        doc = by_key[("piqa", row["doc_id"])]["doc"]
        assert row["choice_len"] == [len(doc["sol1"]), len(doc["sol2"])]
    hellaswag = frame[frame["task"] == "hellaswag"]
    assert hellaswag["choice_len"].map(len).eq(4).all()


def test_choice_columns_survive_the_file(curve):
    root, records, _ = curve
    frame = samples.read_samples(root, records[0])
    counts = frame["choice_ll"].map(len)
    assert (
        counts[frame["task"] == "mmlu"].eq(4).all() and counts[frame["task"] == "piqa"].eq(2).all()
    )
    assert (frame["choice_len"].map(len) == counts).all()
    assert (frame["choice_ll"].map(np.argmax) == frame["pred"]).all()


def test_a_file_without_choice_columns_reads_them_as_none(tmp_path):
    values = ["piqa", "piqa", 0, "a", "b", 1, 1, 1.0, None, "none"]
    row = dict(zip(samples.COLUMNS[:10], values, strict=True))
    blob = gzip.compress((json.dumps(row) + "\n").encode(), mtime=0)
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "k.samples.jsonl.gz").write_bytes(blob)
    ref = {"path": "records/k.samples.jsonl.gz", "sha256": hashlib.sha256(blob).hexdigest()}
    frame = samples.read_samples(tmp_path, {"config_hash": "k", "samples": ref})
    assert frame["choice_ll"].tolist() == [None] and frame["choice_len"].tolist() == [None]
    assert frame["acc"].tolist() == [1.0]
