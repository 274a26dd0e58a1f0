"""mka_exp.manifold: diffusion maps, kNN entropy / MI against references, NPIB, input checks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.feature_selection import mutual_info_regression

import mka_exp.manifold as mf
from mka_exp.manifold import (
    diffusion_map,
    knn_entropy,
    knn_mutual_information,
    layer_similarity,
    npib_similarity,
    rank_normalize,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module on one torch thread: on a shared 2-core machine OpenMP's spin-waiting
    makes small LAPACK calls and short parallel loops 10x slower when a core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(rho: float, n: int, batch: int, seed: int = 0):
    g = _gen(seed)
    x = torch.randn(batch, n, 1, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(batch, n, 1, generator=g)
    return x, y


def _arc(n: int, span: float, seed: int = 0, dim: int = 20):
    """Noisy arc of a unit circle, isometrically embedded in `dim` dims, and its arc parameter."""
    g = _gen(seed)
    s = torch.rand(n, generator=g) * span
    basis = torch.linalg.qr(torch.randn(dim, 2, generator=g)).Q.T  # [2, dim], orthonormal
    x = torch.stack([s.cos(), s.sin()], 1) @ basis + 0.02 * torch.randn(n, dim, generator=g)
    return s, x


def _brute_ksg(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Textbook KSG estimator 1 from full max-norm distance matrices (float64)."""
    x, y = x.double(), y.double()
    dx, dy = torch.cdist(x, x, p=math.inf), torch.cdist(y, y, p=math.inf)
    eps = torch.maximum(dx, dy).sort(-1).values[:, k : k + 1]  # column 0 is the point
    # more than k duplicates give eps = 0 and no strictly closer point: count 0, as ours does
    nx, ny = ((dx < eps).sum(-1) - 1).clamp_min(0), ((dy < eps).sum(-1) - 1).clamp_min(0)
    psi = torch.special.digamma
    n = torch.tensor(float(len(x)), dtype=torch.float64)
    k_ = torch.tensor(float(k), dtype=torch.float64)
    return (psi(k_) + psi(n) - (psi(nx + 1.0) + psi(ny + 1.0)).mean()).item()


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_mi_matches_sklearn_and_analytic(rho):
    x, y = _correlated(rho, 2000, batch=4)
    ours = knn_mutual_information(x, y, k=3)  # batched: [4]
    assert ours.shape == (4,)
    sk = [
        mutual_info_regression(x[b].numpy(), y[b, :, 0].numpy(), n_neighbors=3, random_state=0)[0]
        for b in range(4)
    ]
    # sklearn adds 1e-10-scale noise and rescales; otherwise the same estimator
    np.testing.assert_allclose(ours.numpy(), sk, atol=5e-3)
    truth = -0.5 * math.log(1 - rho**2)
    assert abs(ours.mean().item() - truth) < 0.03
    single = knn_mutual_information(x[0], y[0])
    assert single.ndim == 0 and single.item() == pytest.approx(ours[0].item(), abs=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_mi_fast_path_is_exact(ties):
    """The windowed tables and the three-stage KSG give the textbook estimate exactly, also
    with heavy ties (duplicate points), where every fallback is exercised."""
    g = _gen(1)
    if ties:
        x = torch.randint(0, 6, (2, 700, 2), generator=g).float()
        y = torch.randint(0, 6, (2, 700, 1), generator=g).float()
    else:
        x = torch.randn(2, 700, 2, generator=g)
        y = x[..., :1] * 0.5 + torch.randn(2, 700, 1, generator=g)
    ours = knn_mutual_information(x, y, k=3)
    ref = [_brute_ksg(x[b], y[b], 3) for b in range(2)]
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=1e-5)


def test_knn_entropy_gaussian():
    g = _gen(2)
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]])
    x = torch.randn(3, 3000, 2, generator=g) @ torch.linalg.cholesky(cov).T
    truth = 0.5 * math.log((2 * math.pi * math.e) ** 2 * torch.linalg.det(cov).item())
    h = knn_entropy(x, k=3)
    assert h.shape == (3,)
    assert abs(h.mean().item() - truth) < 0.05
    assert knn_entropy(x[0]).ndim == 0


# ----------------------------------------------------------------------------- diffusion maps


@pytest.mark.parametrize("n", [200, 600])  # dense eigh path, Krylov path
def test_diffusion_map_recovers_arc_parameter(n):
    s, x = _arc(n, math.pi)  # open curve: a half circle
    e = diffusion_map(x)  # defaults: dim 2, alpha 0.5, median bandwidth
    assert e.shape == (n, 2) and torch.isfinite(e).all()
    assert abs(spearmanr(e[:, 0], s).statistic) > 0.9
    s, x = _arc(n, 1.5 * math.pi)  # a longer arc needs a local kernel
    e = diffusion_map(x, bandwidth=0.05)
    assert abs(spearmanr(e[:, 0], s).statistic) > 0.9


def test_krylov_path_matches_eigh(monkeypatch):
    _, x = _arc(300, 1.5 * math.pi)
    x = torch.stack([x, x * torch.linspace(0.5, 1.5, 20)])  # two layers, distinct geometry
    fast = diffusion_map(x, dim=3, bandwidth=0.05)
    monkeypatch.setattr(mf, "EIGH_MAX_N", 10**9)
    exact = diffusion_map(x, dim=3, bandwidth=0.05)
    for layer in range(2):
        for c in range(3):
            corr = np.corrcoef(fast[layer, :, c], exact[layer, :, c])[0, 1]
            assert abs(corr) > 0.999
        np.testing.assert_allclose(fast[layer].abs(), exact[layer].abs(), atol=1e-3, rtol=1e-3)


def test_diffusion_map_batched_and_dtype():
    _, x = _arc(60, math.pi)
    batch = torch.stack([x, 2 * x + 1])  # scaling is absorbed by the median bandwidth
    e = diffusion_map(batch)
    assert e.shape == (2, 60, 2) and e.dtype == torch.float32
    one = diffusion_map(x)
    np.testing.assert_allclose(e[0].abs(), one.abs(), atol=1e-5)
    np.testing.assert_allclose(e[1].abs(), one.abs(), atol=1e-4)
    assert diffusion_map(x.double(), t=0).dtype == torch.float64
    assert diffusion_map(x.half()).dtype == torch.float32


# ----------------------------------------------------------------------------- NPIB


def test_rank_normalize():
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, 5.0]])
    r = rank_normalize(x)
    assert torch.equal(r[:, 0], torch.tensor([1.0, 0.0, 0.5]))
    assert sorted(r[:, 1].tolist()) == [0.0, 0.5, 1.0]  # ties get distinct ordinal ranks
    assert rank_normalize(torch.randn(4, 50, 3)).amax() == 1.0


def test_npib_similarity_properties_with_negative_entropies():
    g = _gen(3)
    base = 1e-3 * torch.randn(300, 2, generator=g)  # tiny scale: differential entropy < 0
    emb = torch.stack(
        [
            base,
            base + 2e-4 * torch.randn(300, 2, generator=g),  # noisy copy of layer 0
            1e-3 * torch.randn(300, 2, generator=g),  # independent
            base[:, :1].expand(300, 2).clone(),  # degenerate: both coordinates equal
        ]
    )
    assert (knn_entropy(emb) < 0).all()
    assert knn_entropy(rank_normalize(emb))[3] < -1  # on [0, 1] ranks too, here
    s = npib_similarity(emb)
    assert s.shape == (4, 4) and torch.isfinite(s).all()
    assert torch.equal(s, s.T)
    assert torch.equal(s.diagonal(), torch.ones(4))
    assert ((s >= 0) & (s <= 1)).all()
    assert s[0, 1] > s[0, 2] + 0.1  # a noisy copy is more similar than independent noise
    assert s[1, 0] > s[1, 2]


def test_layer_similarity_orders_layers():
    """Activations drifting across layers: similarity decays with layer distance."""
    g = _gen(4)
    z = torch.randn(300, 3, generator=g) * torch.tensor([3.0, 1.5, 0.7])
    proj = torch.linalg.qr(torch.randn(32, 3, generator=g)).Q.T
    acts = []
    for _ in range(5):
        z = z + 0.3 * torch.randn(300, 3, generator=g) * torch.tensor([3.0, 1.5, 0.7])
        acts.append(z @ proj + 0.05 * torch.randn(300, 32, generator=g))
    s = layer_similarity(torch.stack(acts))
    assert s.shape == (5, 5) and torch.isfinite(s).all()
    assert s[0, 1] > s[0, 2] > s[0, 4]
    assert s[4, 3] > s[4, 1]


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"bandwidth": 0.0}, "bandwidth=0.0"),
        ({"bandwidth": -2.5}, "bandwidth=-2.5"),
        ({"bandwidth": "mean"}, "bandwidth='mean'"),
        ({"dim": 0}, "dim=0"),
        ({"dim": 40}, "dim=40"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"alpha": -0.1}, "alpha=-0.1"),
    ],
)
def test_diffusion_map_rejects_bad_input(kwargs, pattern):
    x = torch.randn(40, 5)
    with pytest.raises(ValueError, match=re.escape(pattern)):
        diffusion_map(x, **kwargs)


def test_bad_input_messages_name_value_and_range():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=re.escape("dim=10 is outside the allowed range [1, 9]")):
        diffusion_map(x, dim=10)
    with pytest.raises(ValueError, match="positive number or 'median'"):
        diffusion_map(x, bandwidth="auto")
    for fn in (knn_entropy, npib_similarity, layer_similarity):
        with pytest.raises(ValueError, match=re.escape("k=10 is outside the allowed range [1, 9]")):
            fn(x, k=10)
    with pytest.raises(ValueError, match=re.escape("k=12")):
        knn_mutual_information(x[0], x[1], k=12)
    with pytest.raises(ValueError, match=re.escape("alpha=2")):
        layer_similarity(x, alpha=2)
    with pytest.raises(ValueError, match="bandwidth=-1"):
        layer_similarity(x, bandwidth=-1)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_layer_similarity_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = _gen(5)
    acts = torch.randn(6, 700, 64, generator=g).cumsum(0)  # random walk across layers
    cpu = layer_similarity(acts)
    gpu = layer_similarity(acts.cuda())
    assert gpu.device.type == "cuda"
    # float32 kernels differ in the last bits, which may swap a few close ranks
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=0.02)
