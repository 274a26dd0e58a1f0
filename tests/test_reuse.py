"""Reuse across models (issue 29): a variant that starts from the reference's cached hidden
states gives the answers it gives on its own, and never starts from a different model's."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mka_exp.activations import forward_from, layer_inputs
from mka_exp.evaluation.prefix_cache import PrefixCacheHFLM
from mka_exp.evaluation.reuse import Reuse
from mka_exp.fingerprints import fingerprints
from mka_exp.layers import merge_layers, remove_layers
from mka_exp.models.loading import LoadedModel
from mka_exp.state_store import Key, Store
from tests.test_prefix_cache import assert_same_answers, few_shot_requests
from tests.test_prefix_cache import build as family_model

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3_text"]


def build(model_type: str, layers: int = 4) -> LoadedModel:
    """Four layers by default: room for a start below and layers above it."""
    return family_model(model_type, layers)


@torch.no_grad()
@pytest.mark.parametrize("model_type", FAMILIES)
def test_forward_from_equals_full_forward(model_type):
    """Left-padded rows with offset position ids (as the prefix cache runs them)."""
    model = build(model_type).model
    ids = torch.randint(10, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = (torch.arange(20) - torch.tensor([[0], [5]])).clamp(min=0)
    settings = dict(attention_mask=mask, position_ids=positions)
    with layer_inputs(model, [2]) as seen:
        want = model(ids, **settings).logits
    got = forward_from(model, 2, seen[2], **settings).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 5:], want[1, 5:], rtol=1e-5, atol=1e-5)
    assert model.config.num_hidden_layers == 4  # the view is undone
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


def lm(loaded, store=None, layers=(2,)):
    reuse = Reuse(loaded.model, store, list(layers)) if store is not None else None
    return PrefixCacheHFLM(
        pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4, min_shared=8,
        reuse=reuse,
    )  # fmt: skip


def evaluate(loaded, reqs, store=None, layers=(2,)):
    scorer = lm(loaded, store, layers)
    return scorer._loglikelihood_tokens(reqs, disable_tqdm=True), scorer.stats


def merged(loaded: LoadedModel) -> LoadedModel:
    """Layers 2 and 3 merged: layers 0 and 1 are the reference's."""
    variant = copy.deepcopy(loaded)
    merge_layers(variant.model, keep=2, drop=3, lam=0.5)
    return variant


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merged_variant_starts_from_reference(model_type, tmp_path):
    ref = build(model_type)
    reqs = few_shot_requests(ref.model)
    store = Store(tmp_path, 10**8)
    want_ref, stats = evaluate(ref, reqs, store)
    assert stats["reuse_start"] == 0 and store.written > 0
    variant = merged(ref)
    alone, alone_stats = evaluate(variant, reqs)
    got, got_stats = evaluate(variant, reqs, Store(tmp_path, 10**8))
    assert got_stats["reuse_start"] == 2
    assert_same_answers(got, alone)
    assert (
        got_stats["layer_tokens"] == got_stats["run_tokens"] == alone_stats["run_tokens"]
    )  # 1 of 3 layers
    scored = got_stats["scored_positions"]  # the LM head's positions: the same, reuse or not
    assert 0 < scored == alone_stats["scored_positions"] <= sum(len(r[2]) for r in reqs)
    again, _ = evaluate(ref, reqs, Store(tmp_path, 10**8))  # the reference itself, from layer 2
    assert_same_answers(again, want_ref)


def test_changed_layer_below_does_not_reuse(tmp_path):
    ref = build("llama")
    reqs = few_shot_requests(ref.model)
    evaluate(ref, reqs, Store(tmp_path, 10**8))
    variant = merged(ref)
    with torch.no_grad():
        variant.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # a "repaired" layer 1
    alone, _ = evaluate(variant, reqs)
    got, stats = evaluate(variant, reqs, Store(tmp_path, 10**8))
    assert stats["reuse_start"] == 0
    assert_same_answers(got, alone)


def test_fingerprints_see_what_shapes_the_bottom():
    ref = build("llama").model
    prints = fingerprints(ref, 4)
    variant = copy.deepcopy(ref)
    remove_layers(variant, [3])
    assert fingerprints(variant, 3) == prints[:4]  # fewer layers above: the same bottom
    variant.config.rope_theta = 1.0  # a rotary change reaches layer 0's input... via the config
    variant.config.rms_norm_eps = 1e-3
    assert fingerprints(variant, 3)[1] != prints[1]
    half = copy.deepcopy(ref).to(torch.bfloat16)
    assert fingerprints(half, 1)[0] != prints[0]


def test_store_smaller_than_an_entry_stores_nothing(tmp_path):
    ref = build("llama")
    reqs = few_shot_requests(ref.model)
    store = Store(tmp_path, 100)
    want, _ = evaluate(ref, reqs, store)
    assert store.written == 0 and not list(tmp_path.glob("*/*"))
    got, stats = evaluate(merged(ref), reqs, Store(tmp_path, 100))
    assert stats["reuse_start"] == 0


def test_damaged_entry_is_recomputed_not_used(tmp_path):
    ref = build("qwen3")
    reqs = few_shot_requests(ref.model)
    evaluate(ref, reqs, Store(tmp_path, 10**8))
    victim = sorted(tmp_path.glob("*/*.bin"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    variant = merged(ref)
    alone, _ = evaluate(variant, reqs)
    got, stats = evaluate(variant, reqs, Store(tmp_path, 10**8))
    assert stats["reuse_start"] == 0  # the call started from layer 2, met the damage, reran
    assert_same_answers(got, alone)


def test_store_checks_keys_and_evicts_least_recently_used(tmp_path):
    store = Store(tmp_path, 2500)
    keys = [Key("f", str(i), 1) for i in range(4)]
    tensor = torch.arange(200, dtype=torch.float32)  # 974 bytes an entry: two fit
    assert store.put(keys[0], tensor) > 0
    assert store.put(keys[0], tensor) == 0  # already there
    torch.testing.assert_close(store.get(keys[0]), tensor)
    foreign = store.path(keys[1])
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(store.path(keys[0]).read_bytes())  # another key's file under this name
    assert store.get(keys[1]) is None
    foreign.unlink()
    old = store.path(keys[0])
    os.utime(old, (1, 1))  # least recently used
    store.put(keys[1], tensor)
    store.put(keys[2], tensor)
    assert not old.exists() and store.get(keys[2]) is not None
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*")) <= 2500


def backend_rows(model, tokenizer, data_root, **reuse):
    from mka_exp.evaluation.hf import HFEvaluation

    backend = HFEvaluation(
        tasks=["mmlu_anatomy", "piqa", "hellaswag"], limit=3, data_root=data_root,
        num_fewshot={"mmlu_anatomy": 2}, batch_size=4, **reuse,
    )  # fmt: skip
    metrics, rows = backend.evaluate(model, tokenizer)
    return metrics, rows, backend.last_lm.stats


def test_backend_rows_equal_with_and_without_reuse(tmp_path, data_root):
    """Whole evaluations: the dense reference stores, a merged variant starts at layer 2; its
    per-example predictions are identical and its log-likelihoods equal to float tolerance."""
    ref = build("llama")
    on = dict(reuse=str(tmp_path / "reuse"), reuse_layers=2)
    backend_rows(ref.model, ref.tokenizer, data_root, **on)
    variant = merged(ref)
    want, want_rows, _ = backend_rows(variant.model, variant.tokenizer, data_root)
    got, got_rows, stats = backend_rows(variant.model, variant.tokenizer, data_root, **on)
    assert stats["reuse_start"] == 2
    assert got == pytest.approx(want, abs=1e-9)
    assert got_rows["pred"].tolist() == want_rows["pred"].tolist()
    for a, b in zip(got_rows["choice_ll"], want_rows["choice_ll"], strict=True):
        assert list(a) == pytest.approx(list(b), abs=1e-4)


def test_reuse_settings_checked_and_never_hashed(tmp_path, data_root):
    from omegaconf import OmegaConf

    from mka_exp.checks import ConfigError
    from mka_exp.preflight import check_config
    from mka_exp.results import records as results
    from tests.helpers import compose_config

    bad = ["eval.reuse=true", "eval.reuse_layers=0", "eval.reuse_bytes=0"]
    with pytest.raises(ConfigError) as err:
        check_config(compose_config(bad, tmp_path, data_root))
    assert [p.split(":")[0] for p in err.value.problems] == [
        "eval.reuse=True", "eval.reuse_layers=0", "eval.reuse_bytes=0",
    ]  # fmt: skip
    good = compose_config([], tmp_path, data_root)
    other = compose_config(
        [f"eval.reuse={tmp_path}/r", "eval.reuse_layers=[2,3]", "eval.reuse_bytes=99"],
        tmp_path, data_root,
    )  # fmt: skip
    off = compose_config(["eval.reuse=null"], tmp_path, data_root)
    check_config(other)
    assert good.eval.reuse == str(tmp_path / "cache" / "reuse")  # on by default, in the cache dir
    configs = (good, other, off)
    hashes = {results.config_hash(OmegaConf.to_container(c, resolve=True)) for c in configs}
    assert len(hashes) == 1


# --------------------------------------------------------------------------- with the other stages


def repaired_middle_cut(ref: LoadedModel) -> LoadedModel:
    """Layer 3 of 6 removed and ReplaceMe's linear repair folded into layer 2's `down_proj`:
    layers 0 and 1 are the reference's, layer 2 is not."""
    from mka_exp.repair.linear import LinearRepair
    from tests.test_repair import calib_of

    variant = copy.deepcopy(ref)
    calib = calib_of(variant.tokenizer)
    repair = LinearRepair()
    dense = repair.prepare(variant.model, calib)
    remove_layers(variant.model, [3])
    stats = repair.repair(variant.model, calib, {"removed_layers": [3]}, dense)
    assert [fit["layer"] for fit in stats["fits"]] == [2]
    return variant


def test_linear_repair_variant_starts_at_or_below_the_repaired_layer(tmp_path):
    """The reference stores every layer's input; the cut alone would start at 3 (layers 0-2
    unchanged), the repaired cut must start at 2 (its layer 2 has a new `down_proj`)."""
    ref = build("llama", layers=6)
    reqs = few_shot_requests(ref.model)
    evaluate(ref, reqs, Store(tmp_path, 10**8), layers=range(1, 6))
    cut = copy.deepcopy(ref)
    remove_layers(cut.model, [3])
    _, cut_stats = evaluate(cut, reqs, Store(tmp_path, 10**8), layers=range(1, 5))
    assert cut_stats["reuse_start"] == 3
    variant = repaired_middle_cut(ref)
    alone, _ = evaluate(variant, reqs)
    got, stats = evaluate(variant, reqs, Store(tmp_path, 10**8), layers=range(1, 5))
    assert stats["reuse_start"] == 2
    assert_same_answers(got, alone)


class Starts:
    """The start layer of every reuse-enabled call (`Reuse.start` spied on)."""

    def __init__(self, monkeypatch) -> None:
        self.seen: list[int] = []
        real = Reuse.start

        def spy(reuse, root, longest):
            self.seen.append(real(reuse, root, longest))
            return self.seen[-1]

        monkeypatch.setattr(Reuse, "start", spy)


def same_record(got: dict, want: dict) -> None:
    """Equal but for what a run cannot repeat (timings, memory) and the reuse settings (kept out
    of the config hash); the samples' file digest included: the log-likelihoods are bit-equal."""
    drop = {"timings", "peak_memory_bytes", "peak_rss_bytes", "peak_gpu_bytes", "config"}
    assert {k: v for k, v in got.items() if k not in drop} == {
        k: v for k, v in want.items() if k not in drop
    }


CURVE = ["method=reverse_prune", "eval.tasks=[piqa]", "eval.limit=6", "eval.reuse_layers=1"]


def test_curve_points_reuse_the_dense_reference(tmp_path, data_root, monkeypatch):
    """A dense run stores; every point of a curve in one process then starts from it (each
    point's deepest stored layer: 2 of 3, 1 of 2), and records what a run without reuse does."""
    from mka_exp import pipeline
    from tests.helpers import compose_config

    on = [f"eval.reuse={tmp_path / 'store'}"]
    starts = Starts(monkeypatch)
    pipeline.run(compose_config(["method=none", *CURVE[1:], *on], tmp_path / "on", data_root))
    assert starts.seen == [0]
    curve = [*CURVE, "curve=[0.25,0.5]"]
    pipeline.run(compose_config([*curve, *on], tmp_path / "on", data_root))
    assert starts.seen == [0, 2, 1]
    pipeline.run(compose_config([*curve, "eval.reuse=null"], tmp_path / "off", data_root))
    assert starts.seen == [0, 2, 1]  # no reuse, no start
    from mka_exp.results.records import load_record

    keys = sorted(p.stem for p in (tmp_path / "off" / "records").glob("*.json"))
    assert len(keys) == 2
    for key in keys:
        same_record(load_record(tmp_path / "on", key), load_record(tmp_path / "off", key))


def test_resumed_curve_skips_recorded_points_and_reuses_the_store(
    tmp_path, data_root, monkeypatch, watch_evaluations
):
    from mka_exp import pipeline
    from tests.helpers import compose_config

    on = [f"eval.reuse={tmp_path / 'store'}"]
    starts = Starts(monkeypatch)
    pipeline.run(compose_config([*CURVE, "curve=[0.25]", *on], tmp_path / "on", data_root))
    assert starts.seen == [0]  # an empty store: the 3-layer point stores layers 1 and 2
    evaluated = watch_evaluations()
    last = pipeline.run(compose_config([*CURVE, "curve=[0.25,0.5]", *on], tmp_path / "on",
                                       data_root))  # fmt: skip
    assert evaluated == [0.5] and starts.seen == [0, 1]
    off = [*CURVE, "method.ratio=0.5", "eval.reuse=null"]
    want = pipeline.run(compose_config(off, tmp_path / "off", data_root))
    same_record(last, want)


def grid_in_process(root: str, barrier, bound: int = 10**8) -> tuple[list, list, int]:
    """One Slurm job's share of a sweep: the reference, then a merged variant, on one store."""
    torch.set_num_threads(1)
    ref = build("llama")
    reqs = few_shot_requests(ref.model)
    barrier.wait()  # both processes write the same entries at once
    want, _ = evaluate(ref, reqs, Store(root, bound), layers=(1, 2))
    got, stats = evaluate(merged(ref), reqs, Store(root, bound), layers=(1, 2))
    return want, got, stats["reuse_start"]


def entry_problems(root) -> list[str]:
    """Files of the store that are not a whole entry of the key they name."""
    import json

    from mka_exp.state_store import MAGIC, checksum, decode

    problems = []
    for path in sorted(root.glob("*/*")):
        data = path.read_bytes()
        end = data.find(b"\n", len(MAGIC))
        header = json.loads(data[len(MAGIC) : end])
        key = Key(**header["key"])
        if path.relative_to(root).as_posix() != f"{key.name()[:2]}/{key.name()}.bin":
            problems.append(f"{path.name}: foreign")
        if decode(data, key) is None or checksum(data[end + 1 :]) != header["blake2b"]:
            problems.append(f"{path.name}: damaged")
    return problems


def two_jobs(root, bound: int) -> list:
    """Both jobs' (reference answers, variant answers, start), run at once on one store."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            return pool.starmap(grid_in_process, [(str(root), barrier, bound)] * 2)


def test_two_processes_share_one_store(tmp_path):
    """Two processes (spawned, as two Slurm jobs on one cache dir) evaluate the reference and a
    variant into one store at the same time: no entry is damaged or left half-written, and both
    get the answers of the models on their own."""
    root = tmp_path / "store"
    runs = two_jobs(root, 10**8)
    ref = build("llama")
    reqs = few_shot_requests(ref.model)
    want, _ = evaluate(ref, reqs)
    alone, _ = evaluate(merged(ref), reqs)
    for got_ref, got_variant, start in runs:
        assert start == 2
        assert_same_answers(got_ref, want)
        assert_same_answers(got_variant, alone)
    entries = list(root.glob("*/*"))
    assert entries and all(p.name.endswith(".bin") for p in entries)  # no temporary left
    assert entry_problems(root) == []


def test_two_processes_evicting_one_store_keep_exact_answers(tmp_path):
    """The same two jobs on a store a third the size of the grid's entries: each evicts entries
    the other has planned to read (and reads entries the other is replacing), so calls find
    entries gone. A missing entry makes its call run every layer: the answers stay exact, no
    file is damaged, and the store ends within two bounds (each writer keeps the bound at its
    own next eviction and counts only its own writes since its last scan)."""
    ref = build("llama")
    reqs = few_shot_requests(ref.model)
    alone_root = tmp_path / "alone"
    want, _ = evaluate(ref, reqs, Store(alone_root, 10**8), layers=(1, 2))
    sizes = [p.stat().st_size for p in alone_root.glob("*/*")]
    bound = sum(sizes) // 3
    assert max(sizes) < bound < sum(sizes)  # entries fit, the grid's do not
    root = tmp_path / "store"
    runs = two_jobs(root, bound)
    alone, _ = evaluate(merged(ref), reqs)
    for got_ref, got_variant, _ in runs:
        assert_same_answers(got_ref, want)
        assert_same_answers(got_variant, alone)
    entries = list(root.glob("*/*"))
    assert 0 < len(entries) < len(sizes)  # entries were evicted
    assert all(p.name.endswith(".bin") for p in entries)
    assert entry_problems(root) == []
    assert sum(p.stat().st_size for p in entries) <= 2 * bound
