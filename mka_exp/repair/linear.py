"""Linear repair: a least-squares linear map folded into the `down_proj` before each cut.

ReplaceMe (Shopkhoev et al. 2025, "ReplaceMe: Network Simplification via Depth Pruning and
Transformer Block Linearization", https://arxiv.org/abs/2505.02819). After a span of layers is
removed, the last kept layer before it should still hand on what the dense model had *after* the
span. That layer's output is Y + M (Y: the residual stream entering its MLP, M: its MLP output
before the residual add); a linear map T on M is fitted in closed form on calibration tokens,

    T = (MᵀM + αI)⁻¹ Mᵀ(L − Y),

L being the dense model's hidden state after the span, and folded into the MLP's last Linear
(W_down ← Tᵀ W_down, bias too), so the model keeps its shape and stays a valid Hugging Face
checkpoint.

Which layers are repaired: with kept layers at original indices o_0 < o_1 < ..., kept layer o_j
stands for the originals [o_j, o_{j+1}) (the last one up to the end). A kept layer is refitted
when its span holds a removed layer (pruning) or when a merge changed its weights (MKA, LaCo: the
`keep` of each merge), with the dense hidden state at the start of o_{j+1} as its target. Layers
are fitted front to back on the already-repaired model, so each fit sees its real inputs. Layers
removed before the first kept layer have no `down_proj` in front of them and stay unrepaired
(recorded).

The fits stream: memory is bounded by the D × D normal equations (MᵀM, Mᵀ(L − Y), float64) and one
batch of activations, not by the token count (their solution and the ridge choice: `fit.py`). `prepare` keeps a copy of the dense model (taken
before the method runs); each fit runs, batch by batch, the dense copy up to the end of its span
(the target L) and the compressed model up to the fitted layer (M, Y). The layers in front of
the first changed one are the same in both models, so the compressed pass starts there, fed the
dense pass's hidden state. With `reuse` (a store directory; off by default; not part of the config
hash) the dense states at every `reuse_layers`-th boundary are kept for later fits on the same
tokens, which then run the dense model from the highest stored boundary below their cursor, or not
at all (`dense_states.py`; the record's `dense_layer_tokens` counts what ran).

Held-out tokens: a calibration set with a `heldout` part (`calib=hellaswag_passages`) gives each
fit's relative residual on tokens the fit never saw, before and after the map
(`heldout_residual_before/after`); `ridge: auto` picks α per fit from RIDGE_SCALES × tr(MᵀM)/D
by that held-out residual and records the grid (`ridge: [s1, s2, ...]`: from those scales).

Options: `ridge` (α, absolute: MᵀM sums over the fit tokens; or `auto`, or a list of
scales), `diagonal`
(T = diag(t), one scale per channel), `positions` (`all` non-pad tokens, `skip_first`: without
each prompt's first token, whose massive activations dominate a least-squares fit, or `last`
token only) and `max_tokens` (a seeded sample of at most that many positions; null: all). Without
ridge the fit needs at least as many tokens as the hidden size.

Example config (`conf/repair/linear.yaml`)::

    _target_: mka_exp.repair.linear.LinearRepair
    ridge: 0.0
    diagonal: false
    positions: all
    max_tokens: 8192

    python run.py method=mka repair=linear quant=gptq
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mka_exp.activations import last_token_index, select_token_positions
from mka_exp.calibration import CalibrationSet
from mka_exp.contracts import LayerMethod
from mka_exp.layers import (
    decoder_layers,
    hooks_removed_after,
    num_layers,
    swapped_layers,
    with_hidden_input,
)
from mka_exp.repair.dense_states import DenseStates
from mka_exp.repair.fit import (
    RIDGE_SCALES,
    NormalEquations,
    choose_ridge,
    fold_into,
    relative_residual,
    solve_map,
)
from mka_exp.state_store import Store, check_settings

POSITIONS = ("all", "skip_first", "last")


class _StopForward(Exception):
    """Raised by a hook once the layers a pass needs have run."""


@dataclass
class DenseReference:
    """What the fits need from the dense model: a copy of it (never changed) and the tokens."""

    model: nn.Module
    picks: torch.Tensor  # [n, 2] (prompt, position) of the fit tokens, sorted
    heldout: CalibrationSet | None = None
    heldout_picks: torch.Tensor | None = None
    states: DenseStates | None = None  # its boundary states (stored when `reuse` is on)

    def __post_init__(self) -> None:
        if self.states is None:
            self.states = DenseStates(self.model)

    @property
    def total(self) -> int:
        return num_layers(self.model)


# --------------------------------------------------------------------------- tokens and passes


def fit_positions(
    mask: torch.Tensor, positions: str, max_tokens: int | None, seed: int
) -> torch.Tensor:
    """(prompt, position) pairs that feed the fit: [n, 2], sorted, at most `max_tokens`."""
    mask = mask.bool().clone()
    rows = torch.arange(len(mask))
    if positions == "skip_first":
        mask[rows, mask.long().argmax(dim=1)] = False  # first non-pad token of each prompt
    elif positions == "last":
        last = last_token_index(mask)
        only = torch.zeros_like(mask)
        only[rows, last] = mask[rows, last]
        mask = only
    return select_token_positions(mask, max_tokens or int(mask.sum()), seed)


def _batches(calib: CalibrationSet, picks: torch.Tensor, batch_size: int | None) -> Iterator:
    """(batch trimmed to its longest prompt, batch-local rows, columns) of batches with picks."""
    start = 0
    for batch in calib.batches(batch_size):
        size = len(batch["input_ids"])
        inside = (picks[:, 0] >= start) & (picks[:, 0] < start + size)
        if inside.any():
            used = batch["attention_mask"].bool().any(dim=0).nonzero()
            width = int(used.max()) + 1 if len(used) else 1
            trimmed = {name: tensor[:, :width] for name, tensor in batch.items()}
            yield trimmed, picks[inside, 0] - start, picks[inside, 1]
        start += size


def _run(model: nn.Module, batch: dict) -> None:
    device = model.get_input_embeddings().weight.device
    with contextlib.suppress(_StopForward):
        model(**{name: t.to(device) for name, t in batch.items()}, use_cache=False)


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _input_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def compressed_pass(model, batch: dict, cursor: int, fed, position: int) -> tuple:
    """(M, Y + M) of kept layer `position` — its MLP output and its output — running only the
    layers cursor..position, layer `cursor` fed `fed` (the dense model's state there)."""
    layers, seen = decoder_layers(model), {}

    def on_mlp(module, args, output):
        seen["mlp"] = _hidden(output)

    def on_layer(module, args, output):
        seen["out"] = _hidden(output)
        raise _StopForward

    layer = layers[position]
    handles = [layer.mlp.register_forward_hook(on_mlp), layer.register_forward_hook(on_layer)]
    if cursor > 0:
        feed = lambda module, args, kwargs: with_hidden_input(args, kwargs, fed)  # noqa: E731
        handles.append(layers[cursor].register_forward_pre_hook(feed, with_kwargs=True))
    # The layers in front of the cursor stand aside: the cursor layer gets the dense state.
    with hooks_removed_after(handles), swapped_layers(model, dict.fromkeys(range(cursor))):
        _run(model, batch)
    return seen["mlp"], seen["out"]


# --------------------------------------------------------------------------- the fit


def normal_equations(
    model, dense: DenseStates, calib, picks, position: int, end: int, cursor: int, batch_size
) -> NormalEquations:
    """The fit of kept layer `position` (current index) towards dense boundary `end` on the
    tokens `picks` of `calib`, streamed batch by batch. Layers before `cursor` must be the same
    in both models (so the compressed pass starts there)."""
    eq = None
    with torch.no_grad():
        for batch, rows, cols in _batches(calib, picks, batch_size):
            fed, target = dense.boundaries(batch, cursor, end)
            mlp, out = compressed_pass(model, batch, cursor, fed, position)
            device = mlp.device
            rows, cols = rows.to(device), cols.to(device)
            m = mlp[rows, cols].double()
            residual_in = out[rows, cols].double() - m  # Y: what the MLP adds to
            wanted = target[rows.to(target.device), cols.to(target.device)].to(device).double()
            if eq is None:
                dim = m.shape[-1]
                zeros = torch.zeros(dim, dim, dtype=torch.float64, device=device)
                eq = NormalEquations(zeros, zeros.clone(), 0.0, 0)
            eq.add(m, wanted - residual_in)  # L − Y
    return eq


# --------------------------------------------------------------------------- which layers


def repair_plan(method_stats: dict, total: int) -> tuple[list[dict], list[int]]:
    """(kept layers to refit, each with its span; removed layers before the first kept one)."""
    removed = set(method_stats.get("removed_layers") or [])
    if not removed:
        raise ValueError(
            "repair=linear: the method removed no decoder layers (method_stats.removed_layers is "
            "empty); use repair=none"
        )
    merged = {m["keep"] for m in method_stats.get("merges") or []}
    kept = [i for i in range(total) if i not in removed]
    plan = []
    for position, layer in enumerate(kept):
        end = kept[position + 1] if position + 1 < len(kept) else total
        if end - layer > 1 or layer in merged:
            span = list(range(layer, end))
            plan.append(
                {"position": position, "layer": layer, "span": span, "merged": layer in merged}
            )
    return plan, list(range(kept[0]))


def unchanged_prefix(method_stats: dict, total: int) -> int:
    """How many leading layers the method left as they were (same weights, same positions)."""
    touched = set(method_stats.get("removed_layers") or [])
    touched |= {m["keep"] for m in method_stats.get("merges") or []}
    return min(touched, default=total)


def check_architecture(model) -> None:
    """The MLP output must be added to the residual stream as is, through a Linear `down_proj`."""
    layer = decoder_layers(model)[0]
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise NotImplementedError(
            f"repair=linear needs decoder layers with a dense MLP ending in a Linear down_proj; "
            f"{type(layer).__name__} has none (mixture-of-experts models are not supported)"
        )
    if hasattr(layer, "post_feedforward_layernorm"):
        raise NotImplementedError(
            f"repair=linear: {type(layer).__name__} normalises its MLP output before the "
            "residual add, so a map folded into down_proj is not linear in the residual stream"
        )


# --------------------------------------------------------------------------- the stage


def _is_scale(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0


def _check_ridge(ridge) -> float | str | list[float]:
    """A number, `auto` or a non-empty list of scales (held-out choice over them)."""
    if ridge == "auto":
        return ridge
    if isinstance(ridge, Sequence) and not isinstance(ridge, str):
        if ridge and all(_is_scale(scale) for scale in ridge):
            return [float(scale) for scale in ridge]
    elif _is_scale(ridge):
        return float(ridge)
    raise ValueError(
        f"repair.ridge={ridge!r} must be a number >= 0, auto, or a non-empty list of scales >= 0"
    )


def _check_count(name: str, value, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an integer >= 1" + (" or null" if nullable else "")
        raise ValueError(f"repair.{name}={value!r} must be {allowed}")


class LinearRepair:
    """Fit and fold one linear map per cut (ReplaceMe's least squares), see the module doc."""

    def __init__(
        self,
        ridge: float | str = 0.0,
        diagonal: bool = False,
        positions: str = "all",
        max_tokens: int | None = 8192,
        batch_size: int | None = None,
        seed: int = 0,
        reuse: str | None = None,
        reuse_layers: int | list[int] = 4,
        reuse_bytes: int = 16 * 2**30,
    ) -> None:
        check_settings("repair", reuse, reuse_layers, reuse_bytes)
        self.reuse, self.reuse_bytes = reuse or None, reuse_bytes
        self.reuse_layers = (
            list(reuse_layers) if not isinstance(reuse_layers, int) else reuse_layers
        )
        self.ridge = _check_ridge(ridge)
        # The held-out choice's grid: None for a fixed α.
        self.scales = {str: RIDGE_SCALES, list: self.ridge}.get(type(self.ridge))
        if not isinstance(diagonal, bool):
            raise ValueError(f"repair.diagonal={diagonal!r} must be true or false")
        if positions not in POSITIONS:
            raise ValueError(
                f"repair.positions={positions!r} is not allowed; allowed: {', '.join(POSITIONS)}"
            )
        _check_count("max_tokens", max_tokens, nullable=True)
        _check_count("batch_size", batch_size, nullable=True)
        self.diagonal, self.positions = diagonal, positions
        self.max_tokens, self.batch_size, self.seed = max_tokens, batch_size, seed

    def options(self) -> dict:
        names = ("ridge", "diagonal", "positions", "max_tokens")
        return {"name": "linear", **{name: getattr(self, name) for name in names}}

    def check_method(self, method) -> None:
        """Only layer methods remove layers to compensate for (not none, not sparsegpt). Told by
        their contract, not their base class: a repair never imports a method module."""
        if not isinstance(method, LayerMethod):
            name = type(method).__module__.rsplit(".", 1)[-1]
            raise ValueError(
                f"repair=linear needs a layer method (one that removes or merges decoder layers: "
                f"reverse_prune, shortgpt, angular, mka, laco, sleb); method={name} removes none"
            )

    def prepare(self, model, calib: CalibrationSet) -> DenseReference:
        """Check the tokens and keep a copy of the dense model (before the method runs)."""
        check_architecture(model)
        picks = fit_positions(calib.attention_mask, self.positions, self.max_tokens, self.seed)
        heldout = getattr(calib, "heldout", None)
        if self.scales is not None and heldout is None:
            raise ValueError(
                f"repair.ridge={self.ridge} picks the ridge on held-out tokens, and calib {calib.name!r} "
                "has none; use a calibration source with a held-out part "
                "(calib=hellaswag_passages) or a number"
            )
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.ridge == 0 and len(picks) < hidden:
            raise ValueError(
                f"repair=linear has {len(picks)} calibration tokens (repair.positions="
                f"{self.positions}, repair.max_tokens={self.max_tokens}), fewer than the hidden "
                f"size {hidden}: the fit is underdetermined; use more calibration tokens or "
                "repair.ridge > 0"
            )
        held = None
        if heldout is not None:
            held = fit_positions(heldout.attention_mask, self.positions, None, self.seed)
        dense = copy.deepcopy(model).eval().requires_grad_(False)
        store = Store(self.reuse, self.reuse_bytes) if self.reuse else None
        states = DenseStates(dense, store, self.reuse_layers)
        return DenseReference(dense, picks, heldout, held, states)

    def repair(
        self, model, calib: CalibrationSet, method_stats: dict, dense: DenseReference
    ) -> dict:
        """Refit every kept layer that stands for a cut or a merge, front to back, in place."""
        total = dense.total
        plan, unrepaired = repair_plan(method_stats, total)
        expected = total - len(method_stats["removed_layers"])
        if num_layers(model) != expected:
            raise RuntimeError(
                f"repair=linear: the model has {num_layers(model)} layers, the method's stats "
                f"say {expected}"
            )
        start, fits, same = time.perf_counter(), [], unchanged_prefix(method_stats, total)
        before = dense.states.stats()
        for item in plan:
            fits.append(self.fit_one(model, calib, dense, item, min(same, item["position"])))
            same = min(same, item["position"])  # its down_proj changes now
        stats = {
            **self.options(),
            "tokens": len(dense.picks),
            "fits": fits,
            "unrepaired_layers": unrepaired,
            "fit_seconds": round(time.perf_counter() - start, 3),
            # Beside the model: the dense copy and two fits' float64 normal equations (the
            # activations of one batch come and go).
            "held_bytes": model_bytes(dense.model) + 2 * 2 * 8 * _width(model) ** 2,
        }
        if dense.heldout is not None:
            stats["heldout_tokens"] = len(dense.heldout_picks)
        # this repair's share of the dense passes (a curve repairs several points on one)
        return {**stats, **{k: v - before[k] for k, v in dense.states.stats().items()}}

    def fit_one(self, model, calib, dense: DenseReference, item: dict, cursor: int) -> dict:
        """Fit, fold and describe the map of one plan item."""
        position, end = item["position"], item["span"][-1] + 1
        args = (position, end, cursor, self.batch_size)
        eq = normal_equations(model, dense.states, calib, dense.picks, *args)
        fit = dict(item)
        held = None
        if dense.heldout is not None:
            held = normal_equations(model, dense.states, dense.heldout, dense.heldout_picks, *args)
        if self.scales is not None:
            ridge, transform, grid = choose_ridge(eq, held, self.diagonal, self.scales)
            fit.update(ridge=ridge, ridge_grid=grid)
        else:
            transform = solve_map(eq, self.ridge, self.diagonal)
        fit["residual_before"] = relative_residual(eq, None)
        fit["residual_after"] = relative_residual(eq, transform)
        if held is not None:
            fit["heldout_residual_before"] = relative_residual(held, None)
            fit["heldout_residual_after"] = relative_residual(held, transform)
        fold_into(decoder_layers(model)[position].mlp.down_proj, transform)
        return fit


def _width(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a tied weight counted once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
