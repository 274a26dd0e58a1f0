"""The closed-form part of the linear repair (`mka_exp.repair.linear`): given the streamed sums
MᵀM, Mᵀ(L − Y) and ‖L − Y‖², solve for the map T = (MᵀM + αI)⁻¹ Mᵀ(L − Y), measure its relative
residual, pick α on held-out sums, and fold T into a Linear.

Apart from `linear.py` because it is plain float64 linear algebra on D × D matrices, with no model
pass and no hook: it is tested on its own, and `linear.py` keeps the passes and the choice of
which layers to refit. Imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# ridge=auto: α = scale · tr(MᵀM) / D, the scale chosen per fit by the held-out residual.
RIDGE_SCALES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class NormalEquations:
    """MᵀM, Mᵀ(L − Y) and ‖L − Y‖² accumulated in float64."""

    gram: torch.Tensor
    cross: torch.Tensor
    target_sq: float
    tokens: int

    def add(self, mlp: torch.Tensor, wanted: torch.Tensor) -> None:
        self.gram += mlp.T @ mlp
        self.cross += mlp.T @ wanted
        self.target_sq += float((wanted * wanted).sum())
        self.tokens += len(mlp)


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


def ridge_of(eq: NormalEquations, scale: float) -> float:
    """α = scale · tr(MᵀM) / D: a ridge on the scale of the fit's own sums."""
    return scale * float(torch.trace(eq.gram)) / len(eq.gram)


def choose_ridge(
    eq: NormalEquations, heldout: NormalEquations, diagonal: bool, scales=RIDGE_SCALES
) -> tuple:
    """(α, T, grid): the point of `scales` whose map has the lowest held-out residual."""
    grid, best = [], None
    for scale in scales:
        ridge = ridge_of(eq, scale)
        transform = solve_map(eq, ridge, diagonal)
        residual = relative_residual(heldout, transform)
        grid.append({"scale": scale, "ridge": ridge, "heldout_residual": residual})
        if best is None or residual < best[0]:
            best = (residual, ridge, transform)
    return best[1], best[2], grid


def fold_into(linear: nn.Linear, transform: torch.Tensor) -> None:
    """W ← Tᵀ W (and b ← Tᵀ b): the Linear's output row y becomes y T."""
    with torch.no_grad():
        weight = linear.weight
        left = transform.T.to(weight.device, torch.float64)
        weight.copy_((left @ weight.double()).to(weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((left @ linear.bias.double()).to(linear.bias.dtype))
