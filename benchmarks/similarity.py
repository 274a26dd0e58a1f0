"""Benchmark: MKA layer similarity (mka_exp.manifold.layer_similarity) against a plain baseline.

    python benchmarks/similarity.py [--points 512 2048 4096] [--layers 30] [--dim 576]
                                    [--activations acts.npy] [--skip-baseline-above 2048]

For each point count n it builds activations [L, n, D] (synthetic, or the first n points of
`--activations`, an .npy of shape [L, N, D]) and computes the similarity matrix twice:

(a) ours: `layer_similarity` (torch, batched over layers, block-Krylov eigensolver, shared
    kNN distance tables);
(b) baseline: the same definitions written the straightforward way, one layer / one pair at a
    time: scipy pairwise squared distances, the same kernel, median bandwidth and
    normalisation in numpy float64, full `np.linalg.svd` of the normalised kernel, ordinal
    rank normalisation (scipy.stats.rankdata), Kozachenko-Leonenko entropy with sklearn
    NearestNeighbors, and per pair a KSG estimate with sklearn NearestNeighbors / KDTree, i.e.
    the algorithm of sklearn's mutual_info_regression extended to multi-dimensional x and y
    (`--baseline-mi ksg`, the default; a like-for-like implementation comparison).
    `--baseline-mi mir` instead calls sklearn.feature_selection.mutual_info_regression per
    pair and sums the per-column MI over all (column of E_i, column of E_j) pairs; that is a
    different quantity (sum of 1-D MIs, sklearn's noise and scaling), so expect a lower
    Spearman there.

Printed per n: wall time and process CPU time of each (CPU time is the fairer number on a
shared machine), the speedup, and the Spearman correlation of the upper-triangle entries of
the two matrices. `--threads N` limits both sides to N threads; on a machine whose cores are
busy with other work use `--threads 1`: OpenMP/BLAS threads that spin-wait for a descheduled
sibling made both sides ~9x slower there. Synthetic data: n latent points in 3-D follow a random walk across layers
and are mapped by tanh and a fixed orthonormal projection into D dims plus noise, so nearby
layers have similar geometry and far layers drift apart.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.special import digamma
from scipy.stats import rankdata, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mka_exp.manifold import layer_similarity  # noqa: E402


def synthetic(layers: int, n: int, d: int, seed: int = 0) -> np.ndarray:
    """Random walk of a 3-D latent point cloud across layers, embedded in d dims (float32)."""
    rng = np.random.default_rng(seed)
    scales = np.array([3.0, 1.5, 0.7])
    z = rng.standard_normal((n, 3)) * scales
    proj = np.linalg.qr(rng.standard_normal((d, 3)))[0].T  # [3, d], orthonormal rows
    out = np.empty((layers, n, d), dtype=np.float32)
    for layer in range(layers):
        z = z + 0.3 * rng.standard_normal((n, 3)) * scales
        out[layer] = 3 * np.tanh(z / 3) @ proj + 0.05 * rng.standard_normal((n, d))
    return out


# ----------------------------------------------------------------------------- baseline


def base_diffusion(x: np.ndarray, dim: int, alpha: float) -> np.ndarray:
    """One layer [n, D] -> [n, dim]: full SVD of the normalised kernel (paper eq. 2)."""
    sq = cdist(x, x, "sqeuclidean")
    off = sq[~np.eye(len(x), dtype=bool)]
    sigma = np.partition(off, (off.size - 1) // 2)[(off.size - 1) // 2]  # lower median
    k = np.exp(-np.sqrt(sq / sigma))
    q = k.sum(1) ** -alpha
    k = k * q[:, None] * q[None, :]
    d = k.sum(1)
    m = k / np.sqrt(d[:, None] * d[None, :])
    u, s, _ = np.linalg.svd(m)  # m is positive definite: singular vectors = eigenvectors
    sqrt_pi = np.sqrt(d / d.sum())
    return u[:, 1 : dim + 1] / sqrt_pi[:, None] * s[1 : dim + 1]  # drop the trivial one, t=1


def base_ranks(e: np.ndarray) -> np.ndarray:
    return np.stack([rankdata(c, method="ordinal") - 1.0 for c in e.T], 1)


def base_entropy(e: np.ndarray, k: int) -> float:
    n, d = e.shape
    from sklearn.neighbors import NearestNeighbors

    r = NearestNeighbors(n_neighbors=k, metric="chebyshev").fit(e).kneighbors()[0][:, -1]
    return digamma(n) - digamma(k) + d * math.log(2) + d * np.log(r).mean()


def base_ksg(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """KSG estimator 1, as sklearn's _compute_mi_cc but for multi-dimensional x and y."""
    from sklearn.neighbors import KDTree, NearestNeighbors

    xy = np.hstack([x, y])
    eps = NearestNeighbors(n_neighbors=k, metric="chebyshev").fit(xy).kneighbors()[0][:, -1]
    eps = np.nextafter(eps, 0)  # count strictly closer points
    nx = KDTree(x, metric="chebyshev").query_radius(x, eps, count_only=True)
    ny = KDTree(y, metric="chebyshev").query_radius(y, eps, count_only=True)
    return digamma(k) + digamma(len(x)) - np.mean(digamma(nx) + digamma(ny))


def base_mir(x: np.ndarray, y: np.ndarray, k: int) -> float:
    from sklearn.feature_selection import mutual_info_regression

    return sum(
        mutual_info_regression(x, y[:, c], n_neighbors=k, random_state=0).sum()
        for c in range(y.shape[1])
    )


def baseline(acts: np.ndarray, dim: int, alpha: float, k: int, mi: str) -> np.ndarray:
    emb = [base_ranks(base_diffusion(a.astype(np.float64), dim, alpha)) for a in acts]
    h = [base_entropy(e, k) for e in emb]  # rank scale, as in npib_similarity
    fn = base_ksg if mi == "ksg" else base_mir
    s = np.eye(len(emb))
    for i in range(len(emb)):
        for j in range(i + 1, len(emb)):
            s[i, j] = s[j, i] = np.clip(max(fn(emb[i], emb[j], k), 0) / np.sqrt(h[i] * h[j]), 0, 1)
    return s


# ----------------------------------------------------------------------------- driver


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--points", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--dim", type=int, default=576, help="hidden size D of synthetic activations")
    p.add_argument("--activations", type=Path, help=".npy of shape [L, N, D] instead of synthetic")
    p.add_argument("--embed-dim", type=int, default=2, help="diffusion-map dimension")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--baseline-mi", choices=["ksg", "mir"], default="ksg")
    p.add_argument("--skip-baseline-above", type=int, default=2048)
    p.add_argument("--device", default="cpu", help="device for ours (baseline is numpy)")
    p.add_argument(
        "--threads", type=int, help="limit both sides to N threads (torch and numpy's BLAS)"
    )
    args = p.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    full = np.load(args.activations) if args.activations else None
    print(
        f"{'points':>6} {'ours s':>8} {'ours cpu':>8} {'base s':>8} {'base cpu':>8} "
        f"{'speedup':>8} {'spd cpu':>8} {'spearman':>8}"
    )
    for n in args.points:
        acts = full[:, :n] if full is not None else synthetic(args.layers, n, args.dim)
        x = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).to(args.device)
        ours, t_ours, c_ours = timed(
            lambda x=x: layer_similarity(x, args.embed_dim, args.alpha, "median", args.k).cpu()
        )
        row = f"{n:>6} {t_ours:>8.2f} {c_ours:>8.2f}"
        if n <= args.skip_baseline_above:
            base, t_base, c_base = timed(
                lambda a=acts: baseline(a, args.embed_dim, args.alpha, args.k, args.baseline_mi)
            )
            iu = np.triu_indices(len(base), 1)
            rho = spearmanr(ours.numpy()[iu], base[iu]).statistic
            row += f" {t_base:>8.2f} {c_base:>8.2f} {t_base / t_ours:>8.1f} "
            row += f"{c_base / c_ours:>8.1f} {rho:>8.4f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
