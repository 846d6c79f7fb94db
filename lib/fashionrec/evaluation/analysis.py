"""Analyses a reviewer asks for: distance and dimension, UMAP, the hardest queries."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.split import validation_split
from ..ranking import metrics
from .protocol import Evaluation, evaluate_embeddings

# Whitening divides each principal axis by its standard deviation; axes with almost no
# variance (a colour histogram has many) would be blown up into noise that the last bits of
# BLAS decide. Each variance is floored at this share of the mean variance first.
WHITENING_SHRINKAGE = 0.1
REFERENCE_VARIANT = ("raw", "cosine", None)


def pca_reduce(fit_vectors: np.ndarray, vectors: np.ndarray, dim: int, whiten: bool = True,
               seed: int = 0) -> np.ndarray:
    """Projects ``vectors`` on the top ``dim`` principal axes learnt from ``fit_vectors``.

    With ``whiten`` each axis is divided by the square root of its variance plus
    ``WHITENING_SHRINKAGE`` times the mean variance (regularised whitening), so that cosine
    similarity no longer favours the few dominant directions without amplifying the
    near-empty ones.
    """
    from sklearn.decomposition import PCA

    if not 1 <= dim <= min(fit_vectors.shape):
        raise ValueError(f"dim must be between 1 and {min(fit_vectors.shape)}, got {dim}")
    pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(fit_vectors.astype(np.float64))
    projected = pca.transform(vectors.astype(np.float64))
    if whiten:
        variance = pca.explained_variance_
        projected = projected / np.sqrt(variance + WHITENING_SHRINKAGE * variance.mean())
    return projected.astype(np.float32)


def _variants(dims, distances, n_fit: int, d: int) -> list[tuple[str, str, int | None]]:
    variants = [("raw", distance, None) for distance in distances]
    for dim in dims:
        if dim < min(n_fit, d):
            variants += [("PCA", "cosine", dim), ("PCA+whitening", "cosine", dim)]
    return variants


def _transformed(variant, fit_vectors: np.ndarray, vectors: np.ndarray, seed: int) -> np.ndarray:
    kind, _, dim = variant
    if kind == "raw":
        return vectors
    return pca_reduce(fit_vectors, vectors, dim, whiten=kind == "PCA+whitening", seed=seed)


def distance_and_dimension(vectors: np.ndarray, metadata: pd.DataFrame, k: int = 10, dims=(64, 128, 256),
                           distances=("cosine", "l2", "ip"), seed: int = 0,
                           val_fraction: float = 0.2) -> tuple[pd.DataFrame, dict]:
    """Distance and dimension, chosen on validation and reported once on the queries.

    Every variant (each distance on the raw features; PCA and regularised PCA whitening to
    each dimension, by cosine) is scored on a validation part of the train split: its
    images rank the rest of the train split, which also fits the PCA. The best variant
    replaces the reference (raw features, cosine) only when its paired gain on the
    validation images is significant (95% bootstrap interval above zero). Then the chosen
    variant and the reference are scored on query -> gallery, PCA refitted on the whole
    train split, with intervals and their paired difference.

    Returns the validation table (one row per variant) and the chosen setting's summary.
    """
    split = metadata["split"].to_numpy()
    train_rows = np.flatnonzero(split == "train")
    if len(train_rows) == 0:
        raise ValueError("distance and dimension are chosen on a validation part of the train split: embed it too")
    val_mask, _ = validation_split(metadata["label"].to_numpy()[train_rows], val_fraction, seed)
    val_rows, fit_rows = train_rows[val_mask], train_rows[~val_mask]
    if len(val_rows) == 0 or k > len(fit_rows):
        raise ValueError(f"the train split ({len(train_rows)} images) is too small for a validation part at k={k}")
    validation_metadata = metadata.iloc[np.concatenate([val_rows, fit_rows])].reset_index(drop=True)
    validation_metadata["split"] = ["query"] * len(val_rows) + ["gallery"] * len(fit_rows)
    variants = _variants(dims, distances, len(fit_rows), vectors.shape[1])
    rows, per_query = [], {}
    for variant in variants:
        candidate = _transformed(variant, vectors[fit_rows], vectors[np.concatenate([val_rows, fit_rows])], seed)
        evaluation = evaluate_embeddings(candidate, validation_metadata, k=k, index="Flat", metric=variant[1], seed=seed)
        per_query[variant] = evaluation.per_query["precision_at_k"]
        dim = variant[2] or vectors.shape[1]
        rows.append({"variant": variant[0], "distance": variant[1], "dim": dim, "bytes_per_vector_float32": 4 * dim,
                     "val_precision_at_k": evaluation.summary["precision_at_k"],
                     "val_map_at_k": evaluation.summary["map_at_k"]})
    table = pd.DataFrame(rows)
    best = max(variants, key=lambda v: (float(per_query[v].mean()), v == REFERENCE_VARIANT))
    gain = metrics.paired_bootstrap(per_query[best], per_query[REFERENCE_VARIANT], seed=seed)
    chosen = best if best != REFERENCE_VARIANT and gain["low"] > 0 else REFERENCE_VARIANT
    table["chosen"] = [variant == chosen for variant in variants]

    evaluated = np.isin(split, ("gallery", "query"))
    scored = {}
    for variant in dict.fromkeys([REFERENCE_VARIANT, chosen]):
        candidate = _transformed(variant, vectors[train_rows], vectors[evaluated], seed)
        scored[variant] = evaluate_embeddings(candidate, metadata[evaluated].reset_index(drop=True), k=k,
                                              index="Flat", metric=variant[1], seed=seed)
    paired = metrics.paired_bootstrap(scored[chosen].per_query["precision_at_k"],
                                      scored[REFERENCE_VARIANT].per_query["precision_at_k"], seed=seed)
    summary = {
        "chosen": {"variant": chosen[0], "distance": chosen[1], "dim": chosen[2] or vectors.shape[1]},
        "chosen_on": f"validation part of the train split ({len(val_rows)} images ranking {len(fit_rows)})",
        "validation_gain_over_reference": {key: round(float(value), 6) if isinstance(value, float) else value
                                           for key, value in gain.items()},
        "query": {name: scored[variant].to_record(bootstrap_seed=seed) for name, variant in
                  (("reference", REFERENCE_VARIANT), ("chosen", chosen))},
        "query_gain_over_reference": paired,
    }
    for record in summary["query"].values():
        record.pop("per_category", None)
    return table, summary


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
