"""Bad settings stop a run before the model loads, with one line naming the key, the value and
what is allowed (`mka_exp/checks.py`, called by `preflight.check_config`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mka_exp import pipeline
from mka_exp.calibration import text_dataset
from mka_exp.data import read_jsonl
from mka_exp.evaluation import checks as eval_checks
from mka_exp.models.toy import train_tokenizer
from tests.helpers import CONF, compose_config


def first_line_of(tmp_path: Path, data_root: Path, overrides: list[str]) -> str:
    """The run's error (it must be a user error, raised before the model loads)."""
    cfg = compose_config(
        ["method=reverse_prune", "eval.tasks=[piqa]", *overrides], tmp_path, data_root
    )
    with pytest.raises(ValueError) as err:
        pipeline.run(cfg)
    return str(err.value)


BAD_SETTINGS = [
    (["eval.limit=-1"], "eval.limit=-1: allowed an int > 0"),
    (["eval.limit=1.5"], "eval.limit=1.5: allowed"),
    (["eval.batch_size=0"], "eval.batch_size=0: allowed an integer >= 1, auto or auto:N"),
    (["eval.batch_size=big"], "eval.batch_size='big'"),
    (["eval.tasks=piqa"], "eval.tasks='piqa': allowed a list"),
    (["eval.num_fewshot={piqa:-1}"], "eval.num_fewshot.piqa=-1: allowed an integer >= 0"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode='bogus': allowed offline, online"),
    (["calib.max_length=0"], "calib.max_length=0: allowed an integer >= 1"),
    (["calib.batch_size=0"], "calib.batch_size=0: allowed an integer >= 1"),
    (["calib.per_subject=0"], "calib.per_subject=0: allowed an integer >= 1"),
    (["calib.split=train"], "calib.split='train': allowed dev, validation, test"),
    (["calib=text"], "calib.path is not set (???); allowed: a hub dataset id"),
    (
        ["calib=text", "calib.path=/no/such/calib.jsonl"],
        "calib.path='/no/such/calib.jsonl': no such",
    ),
    (["curve=[]"], "curve=[]: allowed a non-empty list of method.ratio values"),
    (["curve=[0.25,abc]"], "curve=[0.25, 'abc']: 'abc' is not a number"),
    (["curve=[0.25,1.5]"], "curve=[0.25, 1.5]: method.ratio=1.5 is outside the allowed range"),
    (["method=none", "curve=[0.25]"], "curve=[0.25]: this method has no method.ratio"),
    (["method.ratio=abc"], "method.ratio='abc' is not a number; allowed a float in (0, 1)"),
    (["method.ratio=null", "method.num_layers=two"], "method.num_layers='two': allowed an integer"),
    (["model.device=gpu"], "model.device='gpu' is not a device; allowed here: auto, cpu"),
    (["model.dtype=float64"], "model.dtype='float64': allowed auto, float32"),
    (["data_root=/no/such/mirror"], "data_root='/no/such/mirror' is not a directory"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    BAD_SETTINGS,
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_setting_is_one_line_before_the_model_loads(
    overrides, expected, no_model, tmp_path, data_root
):
    message = first_line_of(tmp_path, data_root, overrides)
    assert expected in message
    assert len(message.splitlines()) == 1


def test_every_bad_setting_is_reported_at_once(no_model, tmp_path, data_root):
    message = first_line_of(
        tmp_path, data_root, ["eval.limit=-1", "calib.max_length=0", "eval.batch_size=0"]
    )
    lines = message.splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {
        "eval.limit=-1",
        "calib.max_length=0",
        "eval.batch_size=0",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_one_line(no_model, tmp_path, data_root):
    message = first_line_of(tmp_path, data_root, ["model.device=cuda"])
    assert message.startswith("model.device='cuda': this machine has no CUDA device")
    assert "allowed here: auto, cpu" in message


def test_unwritable_records_dir_is_found_first(no_model, tmp_path, data_root):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    message = first_line_of(tmp_path, data_root, [f"paths.records_dir={blocker}/records"])
    assert message.startswith(f"paths.records_dir='{blocker}/records': {blocker} is a file")
    assert not (blocker.parent / "records").exists()  # nothing written


def mirror_with_bad_line(tmp_path: Path, data_root: Path, line: int) -> tuple[Path, Path]:
    """A mirror whose piqa validation file has a cut-off JSON line (MMLU as the real one)."""
    root = tmp_path / "mirror"
    (root / "cais").mkdir(parents=True)
    (root / "cais" / "mmlu").symlink_to(data_root / "cais" / "mmlu")
    bad = root / "baber" / "piqa" / "default" / "validation.jsonl"
    bad.parent.mkdir(parents=True)
    rows = (data_root / "baber" / "piqa" / "default" / "validation.jsonl").read_text().splitlines()
    rows = rows[:20]
    rows[line - 1] = rows[line - 1][:25]
    bad.write_text("\n".join(rows) + "\n")
    return root, bad


def test_corrupt_benchmark_line_names_file_and_line_before_the_model_loads(
    no_model, tmp_path, data_root
):
    root, bad = mirror_with_bad_line(tmp_path, data_root, line=7)
    message = first_line_of(tmp_path, root, ["eval.limit=2"])
    assert message.startswith(f"{bad}:7: not valid JSON")


def test_dataset_missing_from_the_mirror_with_the_hub_unreachable_is_one_line(
    no_model, tmp_path, data_root, monkeypatch
):
    """A partial mirror falls through to the hub; offline, that must name the dataset and the
    mirror folder it was looked for in, not end in the hub client's traceback."""
    import datasets

    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    root = tmp_path / "mirror"
    (root / "cais").mkdir(parents=True)
    (root / "cais" / "mmlu").symlink_to(data_root / "cais" / "mmlu")  # no baber/piqa
    cfg = compose_config(["method=reverse_prune", "eval.tasks=[piqa]"], tmp_path, root)
    with pytest.raises(FileNotFoundError) as err:
        pipeline.run(cfg)
    assert str(err.value).startswith(
        f"dataset 'baber/piqa' is not in data_root={root} (no folder {root / 'baber' / 'piqa'})"
    )
    assert "OfflineModeIsEnabled" in str(err.value)


def test_split_missing_from_a_mirrored_dataset_names_the_file(no_model, tmp_path, data_root):
    root = tmp_path / "mirror"
    (root / "cais").mkdir(parents=True)
    (root / "cais" / "mmlu").symlink_to(data_root / "cais" / "mmlu")
    folder = root / "baber" / "piqa" / "default"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(
        (data_root / "baber" / "piqa" / "default" / "validation.jsonl").read_text()
    )
    cfg = compose_config(["method=reverse_prune", "eval.tasks=[piqa]"], tmp_path, root)
    with pytest.raises(FileNotFoundError) as err:
        pipeline.run(cfg)
    assert str(err.value).startswith(
        f"split 'validation' of 'baber/piqa' is not in the mirror: no {folder}/validation.jsonl "
        "(splits there: train)"
    )


def test_read_jsonl_counts_blank_lines(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(ValueError, match=rf"^{file}:4: not valid JSON"):
        read_jsonl(file)


def test_truncated_text_calibration_file_names_file_and_line(tmp_path):
    file = tmp_path / "calib.jsonl"
    file.write_text(json.dumps({"text": "one"}) + "\n" + '{"text": "tw' + "\n")
    with pytest.raises(ValueError, match=rf"^{file}:2: not valid JSON"):
        text_dataset(train_tokenizer(), str(file))
    file.write_text(json.dumps({"body": "one"}) + "\n")
    with pytest.raises(ValueError, match=r"calib.field='text': row 1 of .* has no such field"):
        text_dataset(train_tokenizer(), str(file))


def test_readme_fewshot_override_works_on_the_default_eval_profile():
    """README: `eval.num_fewshot={mmlu:5}` (Hydra said "Key 'mmlu' is not in struct")."""
    for profile in ("quick", "none", "paper", "mmlu"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                "config", overrides=[f"eval={profile}", "eval.num_fewshot={mmlu:5,piqa:1}"]
            )
        assert (cfg.eval.num_fewshot.mmlu, cfg.eval.num_fewshot.piqa) == (5, 1)


def test_fewshot_from_an_empty_split_is_found_before_the_model_loads(no_model, tmp_path, data_root):
    # The mirror has no train split for piqa: lm-eval's sampler would assert mid-evaluation.
    message = first_line_of(tmp_path, data_root, ["eval.num_fewshot={piqa:1}"])
    assert "eval.num_fewshot asks for examples from piqa" in message
    assert "allowed: 0 shots for those tasks" in message


@pytest.mark.parametrize("good", [1, 16, "auto", "auto:4"])
def test_batch_size_accepts(good):
    eval_checks.check_batch_size(good)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "big", "auto:x", None])
def test_batch_size_rejects(bad):
    with pytest.raises(ValueError, match=r"^eval\.batch_size="):
        eval_checks.check_batch_size(bad)


@pytest.mark.parametrize("good", [None, 1, 50, 0.5, 1.0])
def test_limit_accepts(good):
    eval_checks.check_limit(good)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "abc", True, 0.0])
def test_limit_rejects(bad):
    with pytest.raises(ValueError, match=r"^eval\.limit="):
        eval_checks.check_limit(bad)
