"""Comparisons a reviewer asks for: paired differences, winners, distance and dimension, UMAP.

Every comparison is paired on the same queries: two backbones are scored on the same
query images against galleries of the same images, and the difference is bootstrapped
over queries. A difference whose interval covers zero is reported as not significant.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from . import metrics
from .evaluate import Evaluation, evaluate_embeddings

COMPARED_METRICS = ("precision_at_k", "hit_rate_at_1", "map_at_k")


def _aligned(first: Evaluation, second: Evaluation) -> None:
    if not np.array_equal(first.queries["id"].to_numpy(), second.queries["id"].to_numpy()):
        raise ValueError("paired comparison needs the same queries in the same order")


def paired_comparisons(evaluations: dict, metric_names=COMPARED_METRICS, n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """Every pair of backbones evaluated with the same index: mean difference and its 95% interval."""
    rows = []
    by_index: dict[str, list[str]] = {}
    for backbone, index in evaluations:
        by_index.setdefault(index, []).append(backbone)
    for index, backbones in by_index.items():
        for first, second in combinations(sorted(backbones), 2):
            a, b = evaluations[(first, index)], evaluations[(second, index)]
            _aligned(a, b)
            for name in metric_names:
                result = metrics.paired_bootstrap(a.per_query[name], b.per_query[name], n_boot=n_boot, seed=seed)
                rows.append({"index": index, "metric": name, "a": first, "b": second,
                             "a_minus_b": result["diff"], "low": result["low"], "high": result["high"],
                             "verdict": _verdict(first, second, result)})
    return pd.DataFrame(rows, columns=["index", "metric", "a", "b", "a_minus_b", "low", "high", "verdict"])


def _verdict(first: str, second: str, result: dict) -> str:
    if not result["significant"]:
        return "no significant difference"
    return f"{first} better" if result["diff"] > 0 else f"{second} better"


def winners(table: pd.DataFrame, comparisons: pd.DataFrame, metric_names=COMPARED_METRICS) -> pd.DataFrame:
    """Per index and metric: the best backbone, and whether it beats every other one significantly."""
    rows = []
    for index, group in table.groupby("index", sort=False):
        for name in metric_names:
            ranked = group.sort_values(name, ascending=False)
            best = ranked.iloc[0]["backbone"]
            pairs = comparisons[(comparisons["index"] == index) & (comparisons["metric"] == name)
                                & ((comparisons["a"] == best) | (comparisons["b"] == best))]
            significant = len(pairs) > 0 and bool((pairs["verdict"] == f"{best} better").all())
            rows.append({"index": index, "metric": name, "best": best, "value": ranked.iloc[0][name],
                         "significant_over_all_others": significant})
    return pd.DataFrame(rows)


def pca_reduce(fit_vectors: np.ndarray, vectors: np.ndarray, dim: int, whiten: bool = True, seed: int = 0) -> np.ndarray:
    """Projects ``vectors`` on the top ``dim`` principal axes learnt from ``fit_vectors``.

    With ``whiten`` each axis is divided by its standard deviation, so that cosine
    similarity no longer favours the few dominant directions of the backbone's features.
    """
    from sklearn.decomposition import PCA

    if not 1 <= dim <= min(fit_vectors.shape):
        raise ValueError(f"dim must be between 1 and {min(fit_vectors.shape)}, got {dim}")
    pca = PCA(n_components=dim, whiten=whiten, svd_solver="full", random_state=seed).fit(fit_vectors.astype(np.float64))
    return pca.transform(vectors.astype(np.float64)).astype(np.float32)


def distance_and_dimension(vectors: np.ndarray, metadata: pd.DataFrame, k: int = 10, dims=(64, 128, 256),
                           distances=("cosine", "l2", "ip"), seed: int = 0) -> pd.DataFrame:
    """P@k of exact search for each distance on raw features, and for PCA(+whitening) to each dimension.

    PCA is fitted on the train split when it was embedded, otherwise on the gallery
    (the indexed catalog); never on the queries.
    """
    split = metadata["split"].to_numpy()
    fit_rows = split == "train" if (split == "train").any() else split == "gallery"
    rows = []

    def score(candidate: np.ndarray, variant: str, distance: str, dim: int):
        evaluation = evaluate_embeddings(candidate, metadata, k=k, index="Flat", metric=distance, seed=seed)
        summary = evaluation.summary
        rows.append({"variant": variant, "distance": distance, "dim": dim,
                     "bytes_per_vector_float32": 4 * dim, "precision_at_k": summary["precision_at_k"],
                     "map_at_k": summary["map_at_k"]})

    for distance in distances:
        score(vectors, "raw", distance, vectors.shape[1])
    for dim in dims:
        if dim >= min(int(fit_rows.sum()), vectors.shape[1]):
            continue
        for whiten in (False, True):
            reduced = pca_reduce(vectors[fit_rows], vectors, dim, whiten=whiten, seed=seed)
            score(reduced, "PCA+whitening" if whiten else "PCA", "cosine", dim)
    return pd.DataFrame(rows)


def umap_2d(vectors: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of L2-normalised vectors (cosine geometry), seeded and single-threaded for repeatability."""
    import umap

    normalised = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(vectors) - 1), metric="euclidean",
                        random_state=seed, n_jobs=1)
    return reducer.fit_transform(normalised)


def hardest_queries(evaluation: Evaluation, n: int) -> np.ndarray:
    """Positions of the ``n`` queries with the lowest AP@k (failure analysis), ties by position."""
    ap = evaluation.per_query["map_at_k"]
    return np.argsort(ap, kind="stable")[:n]
