"""Linear repair: a least-squares linear map folded into the `down_proj` before each cut.

ReplaceMe (Shopkhoev et al. 2025, "ReplaceMe: Network Simplification via Depth Pruning and
Transformer Block Linearization", https://arxiv.org/abs/2505.02819). After a span of layers is
removed, the last kept layer before it should still hand on what the dense model had *after* the
span. That layer's output is Y + M (Y: the residual stream entering its MLP, M: its MLP output
before the residual add); a linear map T on M is fitted in closed form on calibration tokens,

    T = (MᵀM + αI)⁻¹ Mᵀ(L − Y),

L being the dense model's hidden state after the span, and folded into the MLP's last Linear
(W_down ← Tᵀ W_down, bias too), so the model keeps its shape and stays a valid Hugging Face
checkpoint. MᵀM and Mᵀ(L − Y) are accumulated over batches in float64, so the token count is not
bounded by memory.

Which layers are repaired: with kept layers at original indices o_0 < o_1 < ..., kept layer o_j
stands for the originals [o_j, o_{j+1}) (the last one up to the end). A kept layer is refitted
when its span holds a removed layer (pruning) or when a merge changed its weights (MKA, LaCo: the
`keep` of each merge), with the dense hidden state at the start of o_{j+1} as its target. Layers
are fitted front to back on the already-repaired model, so each fit sees its real inputs; each
fit runs only the layers since the previous fit, from that one's input kept per batch (at most
one hidden state per calibration token, on CPU). Layers
removed before the first kept layer have no `down_proj` in front of them and stay unrepaired
(recorded). The dense targets come from one capture pass of the dense model, before the method.

Options: `ridge` (α, absolute: MᵀM sums over the fit tokens), `diagonal` (T = diag(t), one scale
per channel), `positions` (`all` non-pad tokens, `skip_first`: without each prompt's first token,
whose massive activations dominate a least-squares fit, or `last` token only) and `max_tokens`
(a seeded sample of at most that many positions). Without ridge the fit needs at least as many
tokens as the hidden size.

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
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mka_exp.activations import last_token_index, select_token_positions
from mka_exp.calibration import CalibrationSet
from mka_exp.layers import decoder_layers, num_layers
from mka_exp.methods.sleb import hooks_removed_after, swapped_layers, with_hidden_input

POSITIONS = ("all", "skip_first", "last")


class _StopForward(Exception):
    """Raised by a hook once the layers a capture needs have run."""


@dataclass
class DenseTargets:
    """The dense model's hidden states at every layer boundary [L+1, n, D] on the fit tokens."""

    picks: torch.Tensor  # [n, 2] (prompt, position), sorted
    states: torch.Tensor  # [L+1, n, D] float32, CPU; index i = input of layer i


# --------------------------------------------------------------------------- tokens and passes


def fit_positions(mask: torch.Tensor, positions: str, max_tokens: int, seed: int) -> torch.Tensor:
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
    return select_token_positions(mask, max_tokens, seed)


def _batches(calib: CalibrationSet, picks: torch.Tensor, batch_size: int | None) -> Iterator:
    """(batch trimmed to its longest prompt, batch-local rows, columns, indices into picks)."""
    start = 0
    for batch in calib.batches(batch_size):
        size = len(batch["input_ids"])
        inside = (picks[:, 0] >= start) & (picks[:, 0] < start + size)
        used = batch["attention_mask"].bool().any(dim=0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        trimmed = {name: tensor[:, :width] for name, tensor in batch.items()}
        yield trimmed, picks[inside, 0] - start, picks[inside, 1], inside.nonzero()[:, 0]
        start += size


def _run(model: nn.Module, batch: dict) -> None:
    device = model.get_input_embeddings().weight.device
    with contextlib.suppress(_StopForward):
        model(**{name: t.to(device) for name, t in batch.items()}, use_cache=False)


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def capture_dense(model, calib, picks: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """[L+1, n, D] float32 hidden states at `picks`, one forward pass per batch."""
    layers = decoder_layers(model)
    state: dict = {}

    def write(slot: int, hidden: torch.Tensor) -> None:
        rows, cols = state["rows"], state["cols"]
        points = hidden[rows.to(hidden.device), cols.to(hidden.device)].float().cpu()
        if "out" not in state:
            state["out"] = torch.empty(len(layers) + 1, len(picks), points.shape[-1])
        state["out"][slot, state["index"]] = points

    def on_input(module, args, kwargs):
        write(0, args[0] if args else kwargs["hidden_states"])

    def on_output(index: int):
        def hook(module, args, output):
            write(index + 1, _hidden(output))
            if index == len(layers) - 1:
                raise _StopForward

        return hook

    handles = [layers[0].register_forward_pre_hook(on_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(on_output(i)) for i, layer in enumerate(layers)]
    with hooks_removed_after(handles), torch.no_grad():
        for batch, rows, cols, index in _batches(calib, picks, batch_size):
            state.update(rows=rows, cols=cols, index=index)
            _run(model, batch)
    return state["out"]


# --------------------------------------------------------------------------- the fit


@dataclass
class NormalEquations:
    """MᵀM, Mᵀ(L − Y) and ‖L − Y‖² accumulated in float64."""

    gram: torch.Tensor
    cross: torch.Tensor
    target_sq: float
    tokens: int


@dataclass
class Prefix:
    """The hidden states entering layer `cursor` of the model being repaired, one tensor per
    batch (CPU): the next fit resumes there instead of re-running the layers before it."""

    cursor: int = 0
    inputs: list | None = None


def _resume_hooks(layers, prefix: Prefix, position: int, seen: dict) -> list:
    """Feed the cached input at `prefix.cursor`; record the input of `position` for the next
    fit (registered in this order, so the second sees what the first fed)."""

    def feed(module, args, kwargs):
        return with_hidden_input(args, kwargs, prefix.inputs[seen["batch"]])

    def record(module, args, kwargs):
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach().cpu()

    handles = []
    if prefix.inputs is not None:
        handles.append(layers[prefix.cursor].register_forward_pre_hook(feed, with_kwargs=True))
    handles.append(layers[position].register_forward_pre_hook(record, with_kwargs=True))
    return handles


def normal_equations(
    model, calib, dense: DenseTargets, position: int, end: int, batch_size, prefix: Prefix
) -> NormalEquations:
    """Accumulate the fit of kept layer `position` (current index) towards dense boundary `end`,
    running only layers prefix.cursor..position; `prefix` moves to `position` afterwards."""
    layers = decoder_layers(model)
    layer = layers[position]
    seen: dict = {}

    def on_mlp(module, args, output):
        seen["mlp"] = _hidden(output)

    def on_layer(module, args, output):
        seen["out"] = _hidden(output)
        raise _StopForward

    handles = _resume_hooks(layers, prefix, position, seen)
    handles += [layer.mlp.register_forward_hook(on_mlp), layer.register_forward_hook(on_layer)]
    # Layers before the cursor stand aside: the cursor layer gets the cached input instead.
    skip = dict.fromkeys(range(prefix.cursor)) if prefix.inputs is not None else {}
    eq, inputs = None, []
    with hooks_removed_after(handles), torch.no_grad(), swapped_layers(model, skip):
        for number, (batch, rows, cols, index) in enumerate(
            _batches(calib, dense.picks, batch_size)
        ):
            seen["batch"] = number
            _run(model, batch)
            inputs.append(seen["input"])
            device = seen["mlp"].device
            rows, cols = rows.to(device), cols.to(device)
            mlp = seen["mlp"][rows, cols].double()
            residual_in = seen["out"][rows, cols].double() - mlp  # Y: what the MLP adds to
            wanted = dense.states[end, index].to(device, torch.float64) - residual_in  # L - Y
            if eq is None:
                dim = mlp.shape[-1]
                zeros = torch.zeros(dim, dim, dtype=torch.float64, device=device)
                eq = NormalEquations(zeros, zeros.clone(), 0.0, 0)
            eq.gram += mlp.T @ mlp
            eq.cross += mlp.T @ wanted
            eq.target_sq += float((wanted * wanted).sum())
            eq.tokens += len(mlp)
    prefix.cursor, prefix.inputs = position, inputs
    return eq


def held_bytes(eq: NormalEquations, prefix: Prefix) -> int:
    """Bytes of one fit's normal equations and the layer inputs cached for the next fit."""
    return eq.gram.nbytes + eq.cross.nbytes + sum(t.nbytes for t in prefix.inputs or [])


def solve_map(eq: NormalEquations, ridge: float, diagonal: bool) -> torch.Tensor:
    """T = (MᵀM + αI)⁻¹ Mᵀ(L − Y), or its diagonal-only version, in float64."""
    gram, cross = eq.gram, eq.cross
    if diagonal:
        denom = torch.diagonal(gram) + ridge
        scale = torch.where(denom > 0, torch.diagonal(cross) / denom.clamp_min(1e-300), 1.0)
        return torch.diag(scale)
    system = gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(cross, factor)
    # Singular MᵀM (dead channels, too few tokens): the minimum-norm least-squares solution.
    return torch.linalg.pinv(system, hermitian=True) @ cross


def relative_residual(eq: NormalEquations, transform: torch.Tensor | None) -> float:
    """‖M T − (L − Y)‖ / ‖L − Y‖ from the accumulated sums (T = identity when None)."""
    if transform is None:
        fit = torch.trace(eq.gram) - 2 * torch.trace(eq.cross)
    else:
        fit = (transform * (eq.gram @ transform)).sum() - 2 * (transform * eq.cross).sum()
    squared = max(float(fit) + eq.target_sq, 0.0)
    return math.sqrt(squared / eq.target_sq) if eq.target_sq > 0 else 0.0


def fold_into(linear: nn.Linear, transform: torch.Tensor) -> None:
    """W ← Tᵀ W (and b ← Tᵀ b): the Linear's output row y becomes y T."""
    with torch.no_grad():
        weight = linear.weight
        left = transform.T.to(weight.device, torch.float64)
        weight.copy_((left @ weight.double()).to(weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((left @ linear.bias.double()).to(linear.bias.dtype))


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


class LinearRepair:
    """Fit and fold one linear map per cut (ReplaceMe's least squares), see the module doc."""

    def __init__(
        self,
        ridge: float = 0.0,
        diagonal: bool = False,
        positions: str = "all",
        max_tokens: int = 8192,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
            raise ValueError(f"repair.ridge={ridge!r} must be a number >= 0")
        if not isinstance(diagonal, bool):
            raise ValueError(f"repair.diagonal={diagonal!r} must be true or false")
        if positions not in POSITIONS:
            raise ValueError(
                f"repair.positions={positions!r} is not allowed; allowed: {', '.join(POSITIONS)}"
            )
        for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"repair.{name}={value!r} must be an integer >= 1")
        self.ridge, self.diagonal, self.positions = float(ridge), diagonal, positions
        self.max_tokens, self.batch_size, self.seed = max_tokens, batch_size, seed

    def options(self) -> dict:
        names = ("ridge", "diagonal", "positions", "max_tokens")
        return {"name": "linear", **{name: getattr(self, name) for name in names}}

    def check_method(self, method) -> None:
        """Only layer methods remove layers to compensate for (not none, not sparsegpt)."""
        from mka_exp.methods.base import LayerMethod

        if not isinstance(method, LayerMethod):
            name = type(method).__module__.rsplit(".", 1)[-1]
            raise ValueError(
                f"repair=linear needs a layer method (one that removes or merges decoder layers: "
                f"reverse_prune, shortgpt, angular, mka, laco, sleb); method={name} removes none"
            )

    def prepare(self, model, calib: CalibrationSet) -> DenseTargets:
        """Check the token count and capture the dense model's hidden states (before the method)."""
        check_architecture(model)
        picks = fit_positions(calib.attention_mask, self.positions, self.max_tokens, self.seed)
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.ridge == 0 and len(picks) < hidden:
            raise ValueError(
                f"repair=linear has {len(picks)} calibration tokens (repair.positions="
                f"{self.positions}, repair.max_tokens={self.max_tokens}), fewer than the hidden "
                f"size {hidden}: the fit is underdetermined; use more calibration tokens or "
                "repair.ridge > 0"
            )
        return DenseTargets(picks, capture_dense(model, calib, picks, self.batch_size))

    def repair(self, model, calib: CalibrationSet, method_stats: dict, dense: DenseTargets) -> dict:
        """Refit every kept layer that stands for a cut or a merge, front to back, in place."""
        total = len(dense.states) - 1
        plan, unrepaired = repair_plan(method_stats, total)
        expected = total - len(method_stats["removed_layers"])
        if num_layers(model) != expected:
            raise RuntimeError(
                f"repair=linear: the model has {num_layers(model)} layers, the method's stats "
                f"say {expected}"
            )
        start, fits, prefix, held = time.perf_counter(), [], Prefix(), 0
        for item in plan:
            end, position = item["span"][-1] + 1, item["position"]
            eq = normal_equations(model, calib, dense, position, end, self.batch_size, prefix)
            held = max(held, held_bytes(eq, prefix))
            transform = solve_map(eq, self.ridge, self.diagonal)
            fold_into(decoder_layers(model)[position].mlp.down_proj, transform)
            fits.append(
                {
                    **item,
                    "residual_before": relative_residual(eq, None),
                    "residual_after": relative_residual(eq, transform),
                }
            )
        seconds = round(time.perf_counter() - start, 3)
        return {
            **self.options(),
            "tokens": len(dense.picks),
            "fits": fits,
            "unrepaired_layers": unrepaired,
            "fit_seconds": seconds,
            # What the repair holds beside the two models: the dense hidden states it fits to,
            # plus the largest fit's normal equations and cached layer inputs.
            "held_bytes": dense.states.nbytes + held,
        }
