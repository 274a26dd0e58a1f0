"""MKA: Manifold-based Knowledge Alignment and layer merging ("Pruning via Merging").

Liu et al. 2024, https://arxiv.org/abs/2406.16330 (Section 2, Algorithm 1). Each layer's output
activations on calibration prompts are embedded with a diffusion map (a low-dimensional manifold
per layer, `mka_exp.manifold`); the Normalized Pairwise Information Bottleneck between two layers'
embeddings, S_ij = I(E_i; E_j) / sqrt(H(E_i) H(E_j)), says how much they know in common. The most
similar pair of layers is merged, theta_m = lam * theta_i + (1 - lam) * theta_j, the merged layer
takes i's place and j is dropped; this repeats until n layers are gone. So unlike pruning, the
dropped layer's parameters still contribute to the model.

What the public code (github.com/SempraETY/Pruning-via-Merging) does differently, and how to get
each behaviour here:

1. Its merge writes into ``model.state_dict()[key]``, a fresh dict, so no weight changes: the
   saved model is reverse-order pruning. Here the merge really changes the weights
   (`mka_exp.layers.merge_layers`).
2. It always merges the last two layers (L-2, L-1), back to front; the similarity only sets lam
   (``pairing: adjacent_back``, ``lam: code``). Algorithm 1 merges the most similar pair
   (``pairing: most_similar``; ``most_similar_adjacent`` restricts it to neighbours).
3. Its kernel bandwidth is sigma_K = 8 on raw activations, whose distances are in the tens or
   more, so the kernel is nearly diagonal (``bandwidth: 8``); the default here is the median
   pairwise distance (on SmolLM2: the same merges, lam within 0.008, a 9x faster eigensolve). It also merges only the seven Linear weights (``scope: linear``), and takes
   as "layer l" the hidden state *entering* layer l (``hidden_states[l]``); we use each layer's
   output, as Section 2.1 says.

Similarity ``once`` (Algorithm 1, and the code) computes S on the dense model; after merging
(keep=i, drop=j) row/column j is dropped and the merged layer keeps row i (S is not re-estimated,
which is what makes one matrix serve a whole compression curve). ``recompute`` recaptures the
activations of the merged model and recomputes S before every merge (one forward pass each).

Example config (`conf/method/mka.yaml`)::

    _target_: mka_exp.methods.mka.MKA
    ratio: 0.25
    pairing: adjacent_back   # Algorithm 1: most_similar (+ lam: paper, scope: all)
    lam: code
    scope: linear
    similarity: once
    bandwidth: median        # the public code: 8
    embedding_dim: 2
    alpha: 0.5
    knn: 3
    representation: tokens
    max_points: 1024
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mka_exp.activations import (
    activation_key,
    load_cache,
    num_points,
    save_cache,
)
from mka_exp.layers import merge_layers, num_layers
from mka_exp.manifold import layer_similarity
from mka_exp.methods.base import (
    LayerMethod,
    LayerTracker,
    capture_for,
    check_amount,
    check_counts,
    set_capture,
)

log = logging.getLogger(__name__)

PAIRINGS = ("adjacent_back", "most_similar_adjacent", "most_similar")
LAM_RULES = ("paper", "code")
SIMILARITY_MODES = ("once", "recompute")
SCOPES = ("all", "linear")


# --------------------------------------------------------------------------- option checks


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lam(lam) -> None:
    if _is_number(lam):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam={lam!r} is outside [0, 1]; allowed: paper, code or [0, 1]")
    elif lam not in LAM_RULES:
        raise ValueError(f"unknown lam rule {lam!r}; allowed: paper, code or a number in [0, 1]")


def check_bandwidth(bandwidth) -> None:
    if bandwidth == "median":
        return
    if not _is_number(bandwidth) or not bandwidth > 0 or math.isinf(bandwidth):
        raise ValueError(f"bandwidth={bandwidth!r} must be 'median' or a positive number")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


# --------------------------------------------------------------------------- pair and lam


def _symmetric(sim: torch.Tensor) -> torch.Tensor:
    """Estimators may be slightly asymmetric; a pair is scored by the mean of both entries."""
    return (sim + sim.T) / 2


def choose_pair(sim: torch.Tensor, pairing: str) -> tuple[int, int]:
    """Positions (keep, drop), keep < drop, of the next merge on the current S [m, m]."""
    m = len(sim)
    if pairing == "adjacent_back":
        return m - 2, m - 1
    score = _symmetric(sim.double())
    if pairing == "most_similar_adjacent":
        i = int(torch.argmax(torch.diagonal(score, offset=1)))  # first max on ties
        return i, i + 1
    if pairing == "most_similar":
        upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=sim.device), diagonal=1)
        flat = int(torch.argmax(score.masked_fill(~upper, -math.inf)))
        return divmod(flat, m)
    raise ValueError(f"unknown pairing {pairing!r}; allowed: {', '.join(PAIRINGS)}")


def merge_ratio(sim: torch.Tensor, i: int, j: int, rule) -> float:
    """lam, the weight of layer i in the merge (1 - lam goes to layer j).

    paper: eq. 4, e^S_ij / (e^S_ij + e^S_ji) (0.5 whenever S is symmetric).
    code:  r_i = mean_k S_ik / (mean_k S_ik + mean_k S_jk), lam = sigmoid(r_i), so lam is in
           (0.5, 0.73) for non-negative S: the kept layer always weighs more.
    """
    if _is_number(rule):
        return float(rule)
    s = sim.double()
    if rule == "paper":
        return float(torch.sigmoid(s[i, j] - s[j, i]))
    if rule == "code":
        mean_i, mean_j = float(s[i].mean()), float(s[j].mean())
        r = mean_i / (mean_i + mean_j) if mean_i + mean_j != 0 else 0.5
        return float(torch.sigmoid(torch.tensor(r, dtype=torch.float64)))
    raise ValueError(f"unknown lam rule {rule!r}; allowed: paper, code or a number in [0, 1]")


def drop_layer(sim: torch.Tensor, j: int) -> torch.Tensor:
    """S without row and column j (the merged layer keeps the kept layer's row)."""
    keep = [k for k in range(len(sim)) if k != j]
    return sim[keep][:, keep]


# --------------------------------------------------------------------------- the method


class MKA(LayerMethod):
    """Merge the most similar (by NPIB on diffusion-map embeddings) layers until n are gone."""

    nested = True  # greedy merges: point k is the first k merges of any longer run

    def __init__(
        self,
        ratio: float | None = None,
        num_layers: int | None = None,
        pairing: str = "adjacent_back",
        lam: str | float = "code",
        scope: str = "linear",
        similarity: str = "once",
        bandwidth: str | float = "median",
        embedding_dim: int = 2,
        alpha: float = 0.5,
        knn: int = 3,
        representation: str = "tokens",
        max_points: int = 1024,
        batch_size: int | None = None,
        cache: str | None = None,
        seed: int = 0,
        similarity_after: bool = True,
    ) -> None:
        _check_choice("pairing", pairing, PAIRINGS)
        if not isinstance(similarity_after, bool):
            raise ValueError(f"similarity_after={similarity_after!r} must be true or false")
        check_lam(lam)
        _check_choice("merge scope", scope, SCOPES)
        _check_choice("similarity mode", similarity, SIMILARITY_MODES)
        check_bandwidth(bandwidth)
        check_positive_int("embedding_dim", embedding_dim)
        check_positive_int("knn", knn)
        if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} must be a number in [0, 1]")
        set_capture(self, representation, max_points, batch_size, cache, seed)
        check_amount(ratio, num_layers)
        self.ratio, self.num_layers = ratio, num_layers
        self.pairing, self.lam, self.scope, self.similarity = pairing, lam, scope, similarity
        self.bandwidth, self.embedding_dim, self.alpha = bandwidth, embedding_dim, alpha
        self.knn, self.similarity_after = knn, similarity_after
        self.artifacts: dict = {}

    def options(self) -> dict:
        names = ("pairing", "lam", "scope", "similarity", "bandwidth", "embedding_dim", "alpha")
        names += ("knn", "representation", "max_points")
        return {name: getattr(self, name) for name in names}

    def check_points(self, calib) -> None:
        """The manifold needs more points than embedding dimensions and neighbours."""
        n = num_points(calib, self.representation, self.max_points)
        if self.embedding_dim >= n:
            raise ValueError(
                f"embedding_dim={self.embedding_dim} must be smaller than the number of "
                f"activation points ({n}, representation={self.representation!r})"
            )
        if self.knn >= n:
            raise ValueError(f"knn={self.knn} must be smaller than the number of points ({n})")

    def progressive(self, model, calib, counts: list[int]) -> Iterator[tuple[int, dict]]:
        """Merge until each count of removed layers is reached, yielding after each."""
        total = num_layers(model)
        counts = check_counts(counts, total)
        self.check_points(calib)
        sim = self.similarity_matrix(model, calib)
        self.artifacts = {"similarity_before": sim.cpu().numpy()}
        tracker, merges, stale = LayerTracker(total), [], False
        for index, count in enumerate(counts):
            while len(merges) < count:
                if stale and self.similarity == "recompute":
                    sim = self.similarity_matrix(model, calib)
                merges.append(self.merge_step(model, sim, tracker))
                sim, stale = drop_layer(sim, merges[-1]["drop_position"]), True
            # S after merging costs a capture pass: only for the final heatmap (unless
            # similarity_after is off), or when the next merge needs it anyway (recompute).
            last = index == len(counts) - 1 and self.similarity_after
            if last or self.similarity == "recompute":
                after = self.similarity_matrix(model, calib)
                self.artifacts["similarity_after"] = after.cpu().numpy()
                if self.similarity == "recompute":
                    sim, stale = after, False  # S of this model is the next merge's S
            yield count, self.stats(merges)

    def merge_step(self, model, sim: torch.Tensor, tracker: LayerTracker) -> dict:
        """One merge chosen on `sim` (positions = current layers); returns its record."""
        i, j = choose_pair(sim, self.pairing)
        lam = merge_ratio(sim, i, j, self.lam)
        record = {"keep": tracker[i], "drop": tracker[j], "lam": lam}
        record["similarity"] = float(_symmetric(sim.double())[i, j])
        merge_layers(model, i, j, lam, scope=self.scope)
        tracker.remove(j)
        return {**record, "drop_position": j}

    def stats(self, merges: list[dict]) -> dict:
        public = [{k: v for k, v in m.items() if k != "drop_position"} for m in merges]
        return {
            "removed_layers": sorted(m["drop"] for m in merges),
            "merges": public,
            **self.options(),
        }

    def similarity_matrix(self, model, calib) -> torch.Tensor:
        """NPIB similarity [L, L] of the model's layer outputs, on the model's device."""
        path = self._similarity_cache(model, calib)
        size = num_layers(model)
        cached = None if path is None else load_cache(path, path.stem, (size, size))
        if cached is not None:
            return cached.to(_device(model))
        start = time.perf_counter()
        states = capture_for(self, model, calib)
        outputs = states[1:].to(_device(model))  # index i+1 = output of layer i
        del states
        captured = time.perf_counter()
        sim = layer_similarity(
            outputs, dim=self.embedding_dim, alpha=self.alpha, bandwidth=self.bandwidth, k=self.knn
        )
        log.info(
            "MKA similarity of %d layers x %d points: capture %.1f s, NPIB %.1f s",
            *outputs.shape[:2], captured - start, time.perf_counter() - captured,
        )  # fmt: skip
        if path is not None:
            save_cache(sim.cpu(), path, path.stem)
        return sim

    def _similarity_cache(self, model, calib) -> Path | None:
        if self.cache is None:
            return None
        key = activation_key(model, calib, self.representation, self.max_points, self.seed)
        opts = f"{self.embedding_dim}_{self.alpha}_{self.bandwidth}_{self.knn}"
        return Path(self.cache).expanduser() / f"npib_{key}_{opts}.pt"


def _device(model) -> torch.device:
    return next(model.parameters()).device
