"""Millions of embedding-like vectors grown from a few thousand real ones, for index benchmarks.

A real gallery holds a few thousand images; indexes must be judged at a million. The
vectors made here keep what decides how an index behaves on real embeddings: where the
clusters are, how far apart neighbours are, and how the spread is shared across dimensions.

* The real rows are split, with the seed, into a base pool (90%) and a query pool (10%):
  queries are grown only from query-pool rows, so no query is a perturbed copy of an item
  that seeded the indexed vectors.
* Each vector starts from a random pool row (anchor), moves a random fraction
  lambda ~ U(0, ``mix``) of the way towards one of the anchor's 10 nearest pool rows (convex
  combinations of neighbours stay on the real manifold; mixing two arbitrary rows would fill
  the space between clusters), then gets Gaussian noise shaped like the real rows' residuals
  around the mean of their 10 nearest neighbours, times ``noise``.
* ``noise_model="covariance"`` (default) draws that noise with the residuals' full covariance;
  ``"diagonal"`` only with their per-dimension variances. Both give every dimension the same
  spread, but the diagonal model drops the correlations between dimensions, so its noise
  spreads over all of them: on EfficientNet-Lite0 features it raises the effective dimension
  (:func:`effective_dimension`) far above the real rows' and makes the vectors much harder to
  compress than real embeddings are. Compare the two with ``effective_dimension``.
* When the real features are non-negative (pooled post-activation CNN features), negative
  values are clipped to zero as the network would.
"""
from __future__ import annotations

import faiss
import numpy as np

from .faiss_index import build_index, search
from .measure import recall_vs_exact

QUERY_POOL_FRACTION = 0.1
NEIGHBOURS = 10
GENERATION_CHUNK_ROWS = 65_536
NOISE_MODELS = ("covariance", "diagonal")


def nearest_neighbours(rows: np.ndarray, count: int) -> np.ndarray:
    """Indices of each row's ``count`` nearest other rows (Euclidean, exact)."""
    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(np.ascontiguousarray(rows, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(rows, dtype=np.float32), count + 1)
    return ids[:, 1:]


def neighbourhood_residuals(real: np.ndarray) -> np.ndarray:
    """Each real row minus the mean of its nearest neighbours: the local spread to imitate."""
    neighbours = nearest_neighbours(real, NEIGHBOURS)
    return real - real[neighbours].mean(axis=1)


def effective_dimension(vectors: np.ndarray) -> float:
    """Participation ratio (sum of covariance eigenvalues)^2 / sum of their squares.

    d for spread shared equally by d orthogonal directions, 1 for spread along one line.
    """
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    eigenvalues = np.linalg.svd(centred, compute_uv=False) ** 2
    return float(eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum())


class ResidualNoise:
    """Gaussian noise with the residuals' covariance (or only their variances), times ``scale``."""

    def __init__(self, residuals: np.ndarray, scale: float, model: str = "covariance"):
        if model not in NOISE_MODELS:
            raise ValueError(f"unknown noise model {model!r}; choose from {', '.join(NOISE_MODELS)}")
        self.model = model
        self.dim = residuals.shape[1]
        if model == "diagonal":
            self.std = (scale * residuals.std(axis=0)).astype(np.float32)
            return
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(residuals.astype(np.float64), rowvar=False, bias=True))
        # z @ factor has covariance factor^T factor = V diag(eigenvalues) V^T = cov, times scale^2.
        self.factor = (scale * np.sqrt(np.clip(eigenvalues, 0, None))[:, None] * eigenvectors.T).astype(np.float32)

    def sample(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((rows, self.dim), dtype=np.float32)
        return z * self.std if self.model == "diagonal" else z @ self.factor


class Synthesizer:
    """Draws vectors around one pool of real rows (see the module docstring)."""

    def __init__(self, pool: np.ndarray, noise: ResidualNoise, mix: float):
        self.pool = pool
        self.neighbours = nearest_neighbours(pool, NEIGHBOURS)
        self.noise = noise
        self.mix = mix
        self.clip_at_zero = bool(pool.min() >= 0)

    def fill(self, out: np.ndarray, rng: np.random.Generator) -> None:
        for start in range(0, len(out), GENERATION_CHUNK_ROWS):
            rows = min(GENERATION_CHUNK_ROWS, len(out) - start)
            anchors = rng.integers(0, len(self.pool), rows)
            partners = self.neighbours[anchors, rng.integers(0, NEIGHBOURS, rows)]
            weight = rng.uniform(0, self.mix, (rows, 1)).astype(np.float32)
            chunk = (1 - weight) * self.pool[anchors] + weight * self.pool[partners]
            chunk += self.noise.sample(rows, rng)
            if self.clip_at_zero:
                np.maximum(chunk, 0, out=chunk)
            out[start:start + rows] = chunk


def make_vectors(real: np.ndarray, n: int, n_queries: int, seed: int, noise: float = 0.5, mix: float = 0.5,
                 noise_model: str = "covariance") -> tuple[np.ndarray, np.ndarray]:
    """``n`` base and ``n_queries`` query vectors grown from disjoint pools of ``real`` rows."""
    minimum = int(2 * (NEIGHBOURS + 1) / QUERY_POOL_FRACTION)
    if real.ndim != 2 or len(real) < minimum:
        raise ValueError(f"need a 2-D array of at least {minimum} real rows, got shape {real.shape}")
    real = np.ascontiguousarray(real, dtype=np.float32)
    split_rng, base_rng, query_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    order = split_rng.permutation(len(real))
    query_pool_size = max(NEIGHBOURS + 1, int(len(real) * QUERY_POOL_FRACTION))
    shaped_noise = ResidualNoise(neighbourhood_residuals(real), noise, noise_model)
    base = np.empty((n, real.shape[1]), np.float32)
    Synthesizer(real[order[query_pool_size:]], shaped_noise, mix).fill(base, base_rng)
    queries = np.empty((n_queries, real.shape[1]), np.float32)
    Synthesizer(real[order[:query_pool_size]], shaped_noise, mix).fill(queries, query_rng)
    return base, queries


def compressibility(real: np.ndarray, factory: str = "PQ40", seed: int = 0, noise: float = 0.5, mix: float = 0.5,
                    noise_model: str = "covariance") -> dict:
    """Recall@10 of exhaustive ``factory`` codes on the real rows and on as many grown ones.

    The real rows are split into base and queries as :func:`make_vectors` splits its pools;
    the grown set has the same sizes. If the grown vectors were much easier to compress than
    the real ones, an index benchmark on them would flatter compact indexes.
    """
    order = np.random.default_rng(seed).permutation(len(real))
    n_queries = max(NEIGHBOURS + 1, int(len(real) * QUERY_POOL_FRACTION))
    sets = {"real": (real[order[n_queries:]], real[order[:n_queries]]),
            "grown": make_vectors(real, len(real) - n_queries, n_queries, seed, noise, mix, noise_model)}
    result = {"factory": factory, "n": len(real) - n_queries, "queries": n_queries}
    for name, (base, queries) in sets.items():
        _, exact = search(build_index(base, "Flat", "cosine", seed), queries, 10, "cosine")
        _, found = search(build_index(base, factory, "cosine", seed), queries, 10, "cosine")
        result[f"recall_at_10_{name}"] = recall_vs_exact(found, exact, 10)
    return result
