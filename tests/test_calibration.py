"""Calibration draws: the default takes the first rows (the paper's draw), a seed draws others."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mka_exp.calibration import format_mmlu, mmlu_prompts, text_dataset
from mka_exp.data import MMLU_SUBJECTS, load_split
from mka_exp.models import train_tokenizer
from mka_exp.results import config_hash
from tests.helpers import CONF, compose_config


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def test_every_calib_option_defaults_to_the_first_rows():
    for path in sorted((CONF / "calib").glob("*.yaml")):
        assert OmegaConf.load(path).seed is None, path.name


def test_default_draw_is_the_first_rows_of_each_subject(tokenizer, data_root):
    calib = mmlu_prompts(tokenizer, per_subject=2, max_length=32, data_root=str(data_root))
    expected = []
    for subject in MMLU_SUBJECTS:
        rows = load_split("cais/mmlu", subject, "validation", str(data_root))
        expected += [format_mmlu(rows[0]), format_mmlu(rows[1])]
    assert calib.texts == expected and calib.name == "mmlu_validation_2"


def test_a_seed_draws_other_rows_reproducibly(tokenizer, data_root):
    def draw(seed):
        return mmlu_prompts(
            tokenizer, per_subject=2, max_length=32, data_root=str(data_root), seed=seed
        )

    first, one, again, two = draw(None), draw(1), draw(1), draw(2)
    assert one.texts == again.texts and one.name == "mmlu_validation_2_seed1"
    assert one.texts != first.texts and one.texts != two.texts
    for index, subject in enumerate(MMLU_SUBJECTS):  # two distinct rows of that subject, in order
        rows = [
            format_mmlu(r) for r in load_split("cais/mmlu", subject, "validation", str(data_root))
        ]
        a, b = one.texts[2 * index : 2 * index + 2]
        assert a in rows and b in rows and rows.index(a) < rows.index(b)


def test_text_samples_follow_the_seed(tokenizer, tmp_path):
    lines = [f"sample {i}" for i in range(20)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines[:10] + ["", "  "] + lines[10:]))
    first = text_dataset(tokenizer, str(path), num_samples=5, max_length=16)
    seeded = text_dataset(tokenizer, str(path), num_samples=5, max_length=16, seed=3)
    assert first.texts == lines[:5]
    assert (
        seeded.texts
        == text_dataset(tokenizer, str(path), num_samples=5, max_length=16, seed=3).texts
    )
    assert (
        seeded.texts != first.texts
        and len(set(seeded.texts)) == 5
        and set(seeded.texts) <= set(lines)
    )
    assert seeded.name == "corpus_train_5_seed3"


@pytest.mark.parametrize("seed", ["abc", 1.5, True])
def test_bad_seed_is_named(tokenizer, tmp_path, seed):
    path = tmp_path / "corpus.txt"
    path.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"calib\.seed=.*allowed: null"):
        text_dataset(tokenizer, str(path), seed=seed)


def test_default_seed_leaves_the_config_hash_as_before_the_key(tmp_path, data_root):
    """Records made before `calib.seed` existed drew the first rows: the same hash resumes them."""
    config = OmegaConf.to_container(compose_config([], tmp_path, data_root), resolve=True)
    assert config["calib"]["seed"] is None
    before_the_key = {**config, "calib": {k: v for k, v in config["calib"].items() if k != "seed"}}
    assert config_hash(config) == config_hash(before_the_key)
    seeded = {**config, "calib": {**config["calib"], "seed": 1}}
    assert config_hash(seeded) != config_hash(config)
