"""Diffusion maps, kNN entropy / mutual information and the NPIB layer similarity of MKA.

Paper: "Pruning via Merging: Compressing LLMs via Manifold Alignment Based Layer Merging"
(MKA), https://arxiv.org/abs/2406.16330, Section 2.

Idea. Each decoder layer l sees the same n calibration points and maps them to activations
H^l in R^D. MKA summarises the geometry of that point cloud with a diffusion map (a few leading
eigenvectors of a normalised kernel on the points), then scores two layers as similar when
their embeddings share much information relative to their own information: the Normalised
Pairwise Information Bottleneck S_ij = I(E_i; E_j) / sqrt(H(E_i) H(E_j)). Layers with high S
carry aligned knowledge and are candidates for merging.

What is implemented:
- paper eq. 2: kernel K_ij = exp(-(||h_i - h_j||^2 / sigma)^0.5), alpha-normalisation and
  symmetric normalisation (Coifman & Lafon 2006); the top eigenvectors of the normalised
  kernel are the smallest of the Laplacian in eq. 2. Coordinates are the standard diffusion
  map lambda^t * v / sqrt(stationary distribution), trivial eigenvector dropped.
- paper eq. 3: NPIB on rank-normalised (copula) embeddings, with I from the Kraskov-Stoegbauer-
  Grassberger estimator 1 (max-norm; Kraskov et al. 2004, eq. 8) and H from the Kozachenko-
  Leonenko estimator (same max-norm; Kraskov et al. 2004, eq. 20).

Everything is batched torch (any device; float32, or float64 for float64 input); no per-pair
Python loops. Only the few leading eigenvectors are computed (block Krylov on the implicit
normalised kernel) except for small n, so a layer costs O(n^2 D) (its pairwise distances)
instead of the O(n^3) of a full eigendecomposition. The kNN searches for all layer pairs
reuse one partially sorted distance table per layer: about L^2 n^1.5 work instead of L^2 n^2,
with every shortcut certified and backed by an exact scan, so the estimates are exact.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "diffusion_map",
    "knn_entropy",
    "knn_mutual_information",
    "layer_similarity",
    "npib_similarity",
    "rank_normalize",
]

EIGH_MAX_N = 256  # up to this many points a dense eigh is cheaper and exact
_CHUNK = 1 << 24  # elements per temporary block on accelerators: bounds peak memory
_CPU_CHUNK = 1 << 20  # on CPU, blocks that stay in cache across the several passes (~1.4x)
_KRYLOV_DEPTH = 8  # max block Krylov steps per cycle (it stops early once converged)
_KRYLOV_RESTARTS = 60


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: int, lo: int, hi: int, what: str = "") -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is outside the allowed range [{lo}, {hi}]{what}")


def _check_bandwidth(bandwidth: float | str) -> None:
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(
                f"bandwidth={bandwidth!r} is not allowed: use a positive number or 'median'"
            )
    elif not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(
            f"bandwidth={bandwidth} is not allowed: use a positive number (> 0) or 'median'"
        )


def _block(x: torch.Tensor) -> int:
    """Elements per temporary block for work on x's device."""
    return _CPU_CHUNK if x.device.type == "cpu" else _CHUNK


def _batched(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """[n, D] or [L, n, D] -> ([L, n, D] in the working float dtype, was_batched)."""
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be [n, D] or [L, n, D], got shape {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x if x.ndim == 3 else x[None]).to(dtype), x.ndim == 3


# ----------------------------------------------------------------------------- diffusion maps


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances [L, n, n] from one batched matmul.

    |a - b|^2 = [a, |a|^2, 1] . [-2b, 1, |b|^2]: the augmented product writes the distances
    directly, with no extra passes over the [n, n] result.
    """
    x = x - x.mean(-2, keepdim=True)  # centring shrinks the cancellation in |a|^2+|b|^2-2ab
    sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()
    one = torch.ones_like(sq)
    d = torch.cat([x, sq, one], -1) @ torch.cat([-2 * x, one, sq], -1).mT
    d.clamp_(min=0).diagonal(dim1=1, dim2=2).zero_()
    return d


def _offdiag_median(sq: torch.Tensor) -> torch.Tensor:
    """Exact lower median of the off-diagonal entries of each [n, n] matrix -> [L].

    Floyd-Rivest style selection, about 3x faster than torch.median here: a strided sample
    brackets the median, one pass counts the entries below the bracket and keeps those inside,
    and a small kthvalue finishes. Falls back to a full kthvalue if the bracket misses.
    """
    n = sq.shape[1]
    flat = sq.flatten(1)
    rank = n + (n * (n - 1) - 1) // 2  # 0-based; the n zero diagonal entries sort first
    sample = flat[:, :: max(1, flat.shape[1] // 16384) | 1]
    size = sample.shape[1]
    pos, half = rank / flat.shape[1] * size, 3.0 * math.sqrt(size)  # +-6 sigma of the quantile
    lo = sample.kthvalue(max(1, math.floor(pos - half)), -1).values
    hi = sample.kthvalue(min(size, math.ceil(pos + half) + 1), -1).values
    out = []
    for row, a, b in zip(flat, lo, hi, strict=True):
        r = rank - int(torch.count_nonzero(row < a))
        inside = row[(row >= a) & (row <= b)]
        ok = 0 <= r < inside.numel()
        out.append(inside.kthvalue(r + 1).values if ok else row.kthvalue(rank + 1).values)
    return torch.stack(out)


def _diffusion_operator(x: torch.Tensor, alpha: float, bandwidth: float | str):
    """Kernel K [L, n, n], scaling w [L, n] and sqrt(stationary distribution) [L, n].

    The symmetric normalised operator is M = diag(w) K diag(w) with K_a = diag(q) K diag(q),
    q = (K 1)^-alpha (alpha-normalisation: removes the sampling density), d = K_a 1 and
    w = q d^-1/2 (M = D^-1/2 K_a D^-1/2 has the spectrum of the Markov matrix D^-1 K_a). M is
    never formed: applying it costs one matvec with K, so K is only scaled through vectors.
    """
    k = _sq_dists(x)
    sigma = _offdiag_median(k) if bandwidth == "median" else torch.full_like(k[:, 0, 0], bandwidth)
    sigma = sigma.clamp_min(torch.finfo(k.dtype).tiny)  # all points equal: no division by 0
    k.sqrt_().mul_(-sigma.rsqrt()[:, None, None]).exp_()  # paper eq. 2: exp(-(|h|^2/sigma)^.5)
    q = k.sum(-1).pow(-alpha)
    d = q * (k @ q[..., None])[..., 0]
    return k, q * d.rsqrt(), (d / d.sum(-1, keepdim=True)).sqrt()


def _apply(k: torch.Tensor, w: torch.Tensor, v0: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(M - v0 v0^T) q: M applied through K; the known top eigenpair (1, sqrt(pi)) is removed."""
    return w[..., None] * (k @ (w[..., None] * q)) - v0 @ (v0.mT @ q)


def _top_eigs_dense(k: torch.Tensor, w: torch.Tensor, v0: torch.Tensor, dim: int):
    """Exact path for small n: full eigh in float64 of the deflated operator."""
    wd, vd = w.double(), v0.double()
    m = wd[..., :, None] * k.double() * wd[..., None, :] - vd @ vd.mT
    vals, vecs = torch.linalg.eigh(m)  # ascending
    return vals[..., -dim:].flip(-1).to(k.dtype), vecs[..., -dim:].flip(-1).to(k.dtype)


def _rayleigh_ritz(v: torch.Tensor, av: torch.Tensor, width: int):
    """Best `width` eigenpair approximations in span(v) -> values, vectors, residual norms."""
    t = (v.mT @ av).double()
    theta, y = torch.linalg.eigh((t + t.mT) / 2)  # tiny: float64 costs nothing
    theta, y = theta.flip(-1)[..., :width].to(v.dtype), y.flip(-1)[..., :width].to(v.dtype)
    u = v @ y
    return theta, u, (av @ y - u * theta[..., None, :]).norm(dim=-2)


def _krylov_cycle(op, q: torch.Tensor, dim: int, tol: float):
    """Grow a block Krylov basis from q until the top `dim` Ritz pairs converge (or the depth
    limit is hit) -> Ritz values, vectors, residuals."""
    basis, images = [q], []
    for step in range(_KRYLOV_DEPTH):
        images.append(op(basis[-1]))
        v, av = torch.cat(basis, -1), torch.cat(images, -1)
        theta, u, res = _rayleigh_ritz(v, av, q.shape[-1])
        if step + 1 == _KRYLOV_DEPTH or res[..., :dim].max() < tol:
            return theta, u, res
        nxt = images[-1]
        for _ in range(2):  # classical Gram-Schmidt twice: full reorthogonalisation
            nxt = nxt - v @ (v.mT @ nxt)
        basis.append(torch.linalg.qr(nxt).Q)
    raise AssertionError("unreachable")


def _top_eigs_krylov(k: torch.Tensor, w: torch.Tensor, v0: torch.Tensor, dim: int):
    """Top `dim` eigenpairs of the deflated operator by restarted block Krylov: O(n^2) per
    step instead of the O(n^3) of a full eigendecomposition."""
    num, n, _ = k.shape
    width = min(n - 1, dim + 8)  # oversampling speeds convergence of the wanted pairs
    tol = 1e-5 if k.dtype == torch.float32 else 1e-9
    gen = torch.Generator().manual_seed(0)  # fixed start: CPU and CUDA give the same result
    q = torch.randn(num, n, width, generator=gen, dtype=torch.float64).to(k)
    q = torch.linalg.qr(q - v0 @ (v0.mT @ q)).Q
    for _ in range(_KRYLOV_RESTARTS):
        theta, q, res = _krylov_cycle(lambda b: _apply(k, w, v0, b), q, dim, tol)
        if res[..., :dim].max() < tol:
            break
    else:  # typically nearly repeated eigenvalues, where single eigenvectors are ill-defined
        msg = f"diffusion map eigensolver stopped at residual {res[..., :dim].max():.1e} > {tol}"
        warnings.warn(msg, stacklevel=4)
    return theta[..., :dim], q[..., :dim]


def _diffusion_chunk(
    x: torch.Tensor, dim: int, alpha: float, bandwidth: float | str, t: int
) -> torch.Tensor:
    k, w, sqrt_pi = _diffusion_operator(x, alpha, bandwidth)
    v0 = sqrt_pi[..., None]  # unit-norm top eigenvector of M, known in closed form
    eig = _top_eigs_dense if x.shape[1] <= EIGH_MAX_N else _top_eigs_krylov
    vals, vecs = eig(k, w, v0, dim)
    # right eigenvectors of the Markov matrix D^-1 K_a, scaled by lambda^t (diffusion time t)
    return vecs / v0 * vals.clamp_min(0).pow(t)[..., None, :]


def diffusion_map(
    x: torch.Tensor,
    dim: int = 2,
    alpha: float = 0.5,
    bandwidth: float | str = "median",
    t: int = 1,
) -> torch.Tensor:
    """Diffusion-map embedding of points x [n, D] (or a batch [L, n, D]) -> [n, dim] / [L, n, dim].

    Kernel exp(-(||h_i - h_j||^2 / sigma)^0.5) (paper eq. 2) with sigma = `bandwidth`, or the
    median off-diagonal squared distance of each layer for "median". Eigenvector signs are
    arbitrary. Output is float32 (float64 for float64 input) on x's device.
    """
    xb, batched = _batched(x, "x")
    n = xb.shape[1]
    _check_int("dim", dim, 1, n - 1, f" (dim must be below the number of points n={n})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside the allowed range [0, 1]")
    _check_bandwidth(bandwidth)
    _check_int("t", t, 0, 10**9)
    per = max(1, 8 * _block(xb) // (n * n))  # layers per chunk: a few [n, n] buffers each
    out = torch.cat([_diffusion_chunk(c, dim, alpha, bandwidth, t) for c in xb.split(per)])
    return out if batched else out[0]


# ----------------------------------------------------------------------------- kNN estimators


def _cheb(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Max-norm distances [..., r, c] between a [..., r, d] and b [..., c, d].

    Loops over the (few) coordinates on contiguous columns: a max over a tiny trailing axis,
    or broadcasting over strided columns, vectorises badly.
    """
    out = None
    for c in range(a.shape[-1]):
        diff = (a[..., c].contiguous()[..., :, None] - b[..., c].contiguous()[..., None, :]).abs_()
        out = diff if out is None else torch.maximum(out, diff, out=out)
    return out


def _scan_prefix(x: torch.Tensor, rows: torch.Tensor, m: int):
    """Exact table rows by a full scan: x [L, n, d], rows [L, r] -> values, indices [L, r, m+1]."""
    num, n, d = x.shape
    step = max(1, _block(x) // (num * n))
    parts = [
        _cheb(x.gather(1, r[..., None].expand(-1, -1, d)), x).topk(m + 1, largest=False)
        for r in rows.split(step, dim=1)
    ]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _window(n: int, d: int, m: int) -> int | None:
    """Half-width (in coordinate-0 order) of the search window for the m+1 nearest points.

    For a uniform copula the m+1 nearest points in max-norm lie within about
    rho = (n/2) ((m+1)/n)^(1/d) ranks in every coordinate; 1.3 rho leaves headroom. None when
    the window would cover most of the row anyway.
    """
    w = max(m + 1, math.ceil(1.3 * 0.5 * n * ((m + 1) / n) ** (1.0 / d)))
    return w if 2 * w + 1 < 0.75 * n else None


def _far(dtype: torch.dtype) -> float | int:
    """A coordinate farther than any real one (integer rank tables cannot hold inf)."""
    return math.inf if dtype.is_floating_point else torch.iinfo(dtype).max // 4


def _window_prefix(xs: torch.Tensor, w: int, m: int):
    """Table rows of points sorted by coordinate 0, searched in a window of +-w positions.

    Returns values [L, n, m+1], sorted positions of the neighbours, and whether each row is
    exact: every point outside the window is at least `gap` away in coordinate 0, so the row
    is exact when its largest kept distance does not exceed that gap.
    """
    num, n, d = xs.shape
    pad = xs.new_full((num, w, d), _far(xs.dtype))
    cols = [c.contiguous() for c in torch.cat([pad, xs, pad], 1).unbind(-1)]  # [L, n+2w]
    step = max(1, _block(xs) // (num * (2 * w + 1)))
    vals, pos = [], []
    for r in range(0, n, step):
        r1 = min(n, r + step)
        dist = None
        for c in range(d):  # window of position p holds positions p-w .. p+w
            diff = (
                cols[c][:, r : r1 + 2 * w].unfold(1, 2 * w + 1, 1)
                - cols[c][:, w + r : w + r1, None]
            )
            dist = diff.abs_() if dist is None else torch.maximum(dist, diff.abs_(), out=dist)
        v, j = dist.topk(m + 1, dim=-1, largest=False)
        vals.append(v)
        pos.append(j + torch.arange(r - w, r1 - w, device=j.device)[:, None])
    x0 = xs[..., 0]
    gap = torch.full_like(x0, _far(xs.dtype))
    span = x0[:, w + 1 :] - x0[:, : n - w - 1]  # x0[p+w+1] - x0[p]
    gap[:, : n - w - 1] = span
    gap[:, w + 1 :] = torch.minimum(gap[:, w + 1 :], span)
    vals = torch.cat(vals, 1)
    return vals, torch.cat(pos, 1), vals[..., -1] <= gap


def _sorted_prefix(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point, the m+1 smallest max-norm distances (ascending, self included) and indices.

    x [L, n, d] -> values, indices [L, n, m+1]: the per-layer distance table that every kNN
    query below reads. Points are sorted by their first coordinate and searched in a window
    of that order; rows the window cannot certify are rescanned in full (exact either way).
    """
    num, n, d = x.shape
    w = _window(n, d, m)
    if w is None:
        return _scan_prefix(x, torch.arange(n, device=x.device).expand(num, n), m)
    order = x[..., 0].argsort(-1)
    xs = x.gather(1, order[..., None].expand(-1, -1, d))
    vals, pos, ok = _window_prefix(xs, w, m)
    lay, row = (~ok).nonzero(as_tuple=True)
    if len(lay):  # rescan the uncertified rows, one layer at a time
        for layer in lay.unique().tolist():
            r = row[lay == layer]
            vals[layer, r], pos[layer, r] = (
                t[0] for t in _scan_prefix(xs[layer : layer + 1], r[None], m)
            )
    idx = order.gather(1, pos.flatten(1)).view_as(pos)  # sorted positions -> point indices
    back = order.argsort(-1)[..., None].expand(-1, -1, m + 1)  # row of point i is at back[i]
    return vals.gather(1, back), idx.gather(1, back)


def _kl_entropy(radius: torch.Tensor, n: int, d: int, k: int) -> torch.Tensor:
    """H = psi(n) - psi(k) + d log 2 + d <log eps>; 2^d is the volume of the unit max-norm ball."""
    radius = radius.to(torch.float64)  # may be an integer rank distance
    tiny = torch.finfo(radius.dtype).tiny  # duplicate points give eps = 0: keep log finite
    const = _digamma(n) - _digamma(k) + d * math.log(2.0)
    return const + d * radius.clamp_min(tiny).log().mean(-1)


def _digamma(v: int) -> float:
    return torch.special.digamma(torch.tensor(float(v), dtype=torch.float64)).item()


def knn_entropy(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Kozachenko-Leonenko differential entropy (nats, max-norm kNN) of x [n, d] or [L, n, d].

    Returns a scalar, or [L] for batched input. Can be negative (it is a differential entropy).
    """
    xb, batched = _batched(x, "x")
    _, n, d = xb.shape
    _check_int("k", k, 1, n - 1, f" (k must be below the number of points n={n})")
    vals, _ = _sorted_prefix(xb, k)
    h = _kl_entropy(vals[..., k], n, d, k).to(xb)  # column k: k-th neighbour; 0 is the point
    return h if batched else h[0]


def _prefix_len(n: int, k: int) -> int:
    """Neighbours kept per point in the distance table. For independent variables the KSG
    marginal counts grow like sqrt(k n); 1.5 times that answers ~98% of the queries from the
    table (measured; the rest are rescanned exactly, so results never depend on this)."""
    return min(n - 1, math.ceil(1.5 * math.sqrt((k + 1) * n)) + 4 * (k + 1))


def _kth_smallest(v: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """(k+1)-th smallest value along `dim` (with multiplicity), for small k.

    Streams the slices through k+1 sorted registers (insertion by elementwise min/max), so the
    work is vectorised across rows; torch.topk pays a per-row cost that dominates short rows.
    """
    if v.device.type != "cpu":  # on accelerators the per-row cost of kthvalue is negligible
        return v.kthvalue(k + 1, dim).values
    slices = v.unbind(dim)
    regs = [torch.full_like(slices[0], _far(v.dtype)) for _ in range(k + 1)]
    tmp = torch.empty_like(regs[0])
    for x in slices:
        for j in range(k, 0, -1):  # top register first, so each reads the old one below it
            torch.minimum(regs[j], torch.maximum(regs[j - 1], x, out=tmp), out=regs[j])
        torch.minimum(regs[0], x, out=regs[0])
    return regs[k]


def _exact_counts(xa, ys, b, i, k):
    """Exact KSG counts (self included) for (partner b, point i) entries by full row scans."""
    dx = _cheb(xa[i, None], xa)[:, 0]  # [F, n]
    dy = _cheb(ys[b, i][:, None], ys[b])[:, 0]
    eps = torch.maximum(dx, dy).topk(k + 1, dim=-1, largest=False).values[:, k:]
    return (dx < eps).sum(-1), (dy < eps).sum(-1), torch.ones_like(eps[:, 0], dtype=torch.bool)


def _ksg_rows(vxa, ixa, ycols, vys, rows: slice, c: int, k: int):
    """KSG counts (self included) [B, r] of points `rows` for the pairs (x, y_b).

    The joint max-norm distance is max(dx, dy). Candidates for the k-th joint neighbour are the
    c nearest points in x; the answer is exact when it does not exceed the c-th x-distance
    (farther points have joint distance >= that), and the counts are exact when eps does not
    exceed the c-th y-distance either. Also returns where both held. ycols: y coordinates,
    one point-major [n, B] tensor each, so gathering a candidate copies one row for all B.
    """
    vx = vxa[rows, :c].contiguous()  # [r, c]
    vy = vys[:, rows, :c].contiguous()  # [B, r, c]
    cand = ixa[rows, :c].T.reshape(-1)  # candidate-major
    joint = vx.T[..., None]  # [c, r, 1]
    for yc in ycols:  # y-distances to the candidates, coordinate by coordinate
        diff = (yc.index_select(0, cand).view(c, -1, yc.shape[1]) - yc[rows]).abs_()
        joint = torch.maximum(diff, joint, out=diff)  # [c, r, B]
    eps = _kth_smallest(joint, k, dim=0)  # [r, B]; the point itself is the 1st neighbour
    nx = torch.searchsorted(vx, eps).T  # number of x-distances < eps
    ny = torch.searchsorted(vy, eps.T[..., None].contiguous())[..., 0]
    return nx, ny, (eps <= vx[:, -1:]).T & (vy[..., -1] >= eps.T)


def _ksg_entries(xa, vxa, ixa, ycols, vys, b, i, k: int):
    """As _ksg_rows with the whole table, for a list of (partner b, point i) entries."""
    vx, cand, vy = vxa[i], ixa[i], vys[b, i]  # [F, m+1]
    joint = vx.clone()
    for yc in ycols:
        n = yc.shape[1]
        diff = yc.take(b[:, None] * n + cand) - yc.take(b * n + i)[:, None]
        torch.maximum(joint, diff.abs_(), out=joint)
    eps = _kth_smallest(joint.T.contiguous(), k, dim=0)[:, None]
    ok = (eps <= vx[:, -1:]) & (eps <= vy[:, -1:])
    return torch.searchsorted(vx, eps)[:, 0], torch.searchsorted(vy, eps)[:, 0], ok[:, 0]


def _refine(nx, ny, ok, fn, chunk: int) -> None:
    """Recompute the entries that are not certified yet with fn(b, i) -> (nx, ny, ok)."""
    b, i = (~ok).nonzero(as_tuple=True)
    for bc, ic in zip(b.split(chunk), i.split(chunk), strict=True):
        nx[bc, ic], ny[bc, ic], ok[bc, ic] = fn(bc, ic)


def _ksg_one_vs_many(xa, vxa, ixa, ys, vys, k: int) -> torch.Tensor:
    """KSG estimator 1, I = psi(k) + psi(n) - <psi(n_x + 1) + psi(n_y + 1)>, between one
    variable xa [n, dx] (with its distance table vxa, ixa) and each ys[b] [n, dy] -> [B].

    Three stages, each exact where it certifies itself: the ~sqrt(k n) nearest x-candidates
    (enough for most points), then the whole table for the rest, then full row scans.
    """
    num, n, _ = ys.shape
    m1 = vxa.shape[-1]
    c = min(m1, math.ceil(math.sqrt((k + 1) * n)) + 1)
    step = max(1, _block(ys) // (num * c))
    points_major = [t.T.contiguous() for t in ys.unbind(-1)]  # [n, B] per coordinate
    parts = [
        _ksg_rows(vxa, ixa, points_major, vys, slice(r, r + step), c, k) for r in range(0, n, step)
    ]
    ycols = [t.contiguous() for t in ys.unbind(-1)]  # [B, n] per coordinate
    nx, ny, ok = (torch.cat(p, 1) for p in zip(*parts, strict=True))
    if c < m1:
        _refine(
            nx,
            ny,
            ok,
            lambda b, i: _ksg_entries(xa, vxa, ixa, ycols, vys, b, i, k),
            _block(ys) // m1,
        )
    if m1 < n:
        _refine(nx, ny, ok, lambda b, i: _exact_counts(xa, ys, b, i, k), _block(ys) // n)
    # counts include the point itself, so they equal n_x + 1; the clamp covers eps = 0
    # (more than k duplicates), where nothing is strictly closer
    f64 = torch.float64
    psi = torch.special.digamma(nx.clamp_min(1).to(f64)) + torch.special.digamma(
        ny.clamp_min(1).to(f64)
    )
    return _digamma(k) + _digamma(n) - psi.mean(-1)


def knn_mutual_information(x: torch.Tensor, y: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Kraskov (KSG estimator 1, max-norm) mutual information in nats.

    x [n, dx], y [n, dy] -> scalar; or batched x [B, n, dx], y [B, n, dy] -> [B]. Not clamped
    at 0 (the estimator is nearly unbiased, so independent variables give values around 0).
    """
    xb, batched = _batched(x, "x")
    yb, _ = _batched(y, "y")
    if xb.shape[:2] != yb.shape[:2]:
        raise ValueError(f"x and y must share batch and point dims, got {x.shape} and {y.shape}")
    n = xb.shape[1]
    _check_int("k", k, 1, n - 1, f" (k must be below the number of points n={n})")
    m = _prefix_len(n, k)
    vx, ix = _sorted_prefix(xb, m)
    vy, _ = _sorted_prefix(yb, m)
    mi = torch.cat(
        [
            _ksg_one_vs_many(xb[b], vx[b], ix[b], yb[b : b + 1], vy[b : b + 1], k)
            for b in range(len(xb))
        ]
    ).to(xb)
    return mi if batched else mi[0]


def _ranks(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Ordinal ranks 0..n-1 along the points axis (-2); ties broken by position."""
    return x.argsort(dim=-2, stable=True).argsort(dim=-2).to(dtype or x.dtype)


def rank_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-column ranks scaled to [0, 1] (the empirical copula transform).

    x [n, d] or [L, n, d] (points on axis -2); a 1-D x is one column. Ties get distinct
    ordinal ranks in order of position.
    """
    col = x[:, None] if x.ndim == 1 else x
    xf = col.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    r = _ranks(xf) / max(col.shape[-2] - 1, 1)
    return r[:, 0] if x.ndim == 1 else r


def npib_similarity(embeddings: torch.Tensor, k: int = 3) -> torch.Tensor:
    """NPIB similarity (paper eq. 3) between layer embeddings [L, n, d] -> S [L, L].

    S_ij = I(E_i; E_j) / sqrt(H(E_i) H(E_j)) on rank-normalised embeddings, I by KSG and H by
    Kozachenko-Leonenko. Symmetric, diagonal 1 (I(E; E) = H(E)), entries clipped to [0, 1].

    Entropy <= 0: after rank normalisation each coordinate is uniform on [0, 1], so the
    differential entropy of an embedding is <= 0 (minus its total correlation) and its kNN
    estimate sits around or below 0: the ratio would be NaN or explode. We measure entropies
    on the rank scale 0..n-1 instead, i.e. shift every H by the same constant d*log(n-1) (the
    entropy at a resolution of one rank step). Distinct ordinal ranks put every k-th neighbour
    at max-norm distance >= 1 on that scale, hence H >= psi(n) - psi(k) + d*log 2 > 0 for every
    layer; we also clamp at that bound. I is scale-invariant, so it is unchanged; negative I
    estimates are clamped to 0.
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be [L, n, d], got shape {tuple(embeddings.shape)}")
    emb = _batched(embeddings, "embeddings")[0]
    e = _ranks(emb, torch.int32)  # exact integer distances; int32 selection is ~1.5x faster
    num, n, d = e.shape
    _check_int("k", k, 1, n - 1, f" (k must be below the number of points n={n})")
    vals, idx = _sorted_prefix(e, _prefix_len(n, k))
    floor = _digamma(n) - _digamma(k) + d * math.log(2.0)
    h = _kl_entropy(vals[..., k], n, d, k).clamp_min(floor)
    s = torch.eye(num, dtype=torch.float64, device=e.device)
    for a in range(num - 1):  # one layer against all later ones, vectorised over partners
        mi = _ksg_one_vs_many(e[a], vals[a], idx[a], e[a + 1 :], vals[a + 1 :], k)
        s[a, a + 1 :] = (mi.clamp_min(0) / (h[a] * h[a + 1 :]).sqrt()).clamp(0, 1)
    return torch.maximum(s, s.mT).to(emb.dtype)  # fill the lower triangle


def layer_similarity(
    activations: torch.Tensor,
    dim: int = 2,
    alpha: float = 0.5,
    bandwidth: float | str = "median",
    k: int = 3,
) -> torch.Tensor:
    """MKA layer similarity: per-layer diffusion map of activations [L, n, D], then NPIB -> [L, L]."""
    if activations.ndim != 3:
        raise ValueError(f"activations must be [L, n, D], got shape {tuple(activations.shape)}")
    n = activations.shape[1]
    _check_int("k", k, 1, n - 1, f" (k must be below the number of points n={n})")
    return npib_similarity(diffusion_map(activations, dim, alpha, bandwidth), k)
