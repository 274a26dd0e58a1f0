"""Calibration draws: the default takes the first rows (the paper's draw), a seed draws others."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mka_exp.calibration import (
    PASSAGES,
    format_mmlu,
    hellaswag_passage,
    hellaswag_passages,
    mmlu_prompts,
    text_dataset,
    tokenize,
)
from mka_exp.data import MMLU_SUBJECTS, load_split
from mka_exp.models.toy import train_tokenizer
from mka_exp.results.records import config_hash
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


def passages(tokenizer, data_root, **kwargs):
    settings = {"num_tokens": 3000, "heldout_tokens": 800, "max_length": 64, **kwargs}
    return hellaswag_passages(tokenizer, data_root=str(data_root), **settings)


def token_count(calib) -> int:
    return int(calib.attention_mask.sum())


def test_passages_are_rows_past_start_row_with_a_fixed_heldout_tail(tokenizer, data_root):
    """Fit rows from `start_row` on, just enough tokens; held-out rows from the split's end,
    the same for any fit size, never among the fit rows."""
    texts = [hellaswag_passage(r) for r in load_split(*PASSAGES, str(data_root))]
    small, large = passages(tokenizer, data_root), passages(tokenizer, data_root, num_tokens=6000)
    index = {text: number for number, text in enumerate(texts)}
    rows = sorted(index[t] for t in small.texts)
    assert rows == list(range(1000, 1000 + len(rows)))
    assert token_count(small) >= 3000
    last = tokenize([texts[rows[-1]]], tokenizer, 64, "last", 1)
    assert token_count(small) - token_count(last) < 3000  # whole rows, no more than needed
    held = sorted(index[t] for t in small.heldout.texts)
    assert held == list(range(len(texts) - len(held), len(texts)))
    assert token_count(small.heldout) >= 800
    assert sorted(large.heldout.texts) == sorted(small.heldout.texts)
    assert token_count(large) >= 6000 and not set(large.texts) & set(large.heldout.texts)
    lengths = small.attention_mask.sum(dim=1).tolist()
    assert lengths == sorted(lengths)  # shortest first: batches pad little
    assert small.name == f"hellaswag_passages_1000_{token_count(small)}"


def test_seeded_passages_draw_other_rows_past_start_row(tokenizer, data_root):
    texts = [hellaswag_passage(r) for r in load_split(*PASSAGES, str(data_root))]
    index = {text: number for number, text in enumerate(texts)}
    first, one, again = (passages(tokenizer, data_root, seed=s) for s in (None, 1, 1))
    assert sorted(one.texts) == sorted(again.texts) and set(one.texts) != set(first.texts)
    held = {index[t] for t in one.heldout.texts}
    assert all(1000 <= index[t] < min(held) for t in one.texts)
    assert one.name.endswith("_seed1")


def test_too_many_passage_tokens_are_refused(tokenizer, data_root):
    with pytest.raises(ValueError, match=r"calib.num_tokens=100000000 .* ask for fewer"):
        passages(tokenizer, data_root, num_tokens=100_000_000)
