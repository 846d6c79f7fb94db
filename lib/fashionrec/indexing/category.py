"""Category-aware search: a score bonus for gallery items of the query's (predicted) category.

The gallery is partitioned by category, one index per partition (the same FAISS factory,
or ``Flat`` where a partition is too small to train it); each query searches every
partition and the hits are merged after adding ``boost`` to its own category's scores.
With exact partitions this is exactly "cosine + boost x same category" over the whole
gallery; ``boost = inf`` ranks the query's category first (by similarity), then the rest,
so a query never gets fewer than k results.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import IndexBuildError
from .faiss_index import build_index, search

# Larger than any difference of two cosine (or inner product of unit vectors) scores.
HARD_BOOST = 4.0


def category_aware_search(gallery: np.ndarray, gallery_categories, queries: np.ndarray, query_categories, k: int,
                          boost: float, factory: str = "Flat", metric: str = "cosine", params: str = "",
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores, ids, partitions) of the top ``k`` gallery rows per query, ``boost`` added to its category's rows.

    ``scores`` are similarities (the negated distance for ``l2``) plus the bonus; ``ids`` are
    gallery row positions (-1 where an approximate index found fewer). ``partitions`` maps
    each gallery category to the factory its index was built with.
    """
    gallery_categories = np.asarray(gallery_categories).astype(str)
    query_categories = np.asarray(query_categories).astype(str)
    bonus = HARD_BOOST if math.isinf(boost) else float(boost)
    n_queries = len(queries)
    all_scores, all_ids, partitions = [], [], {}
    for category in sorted(set(gallery_categories)):
        rows = np.flatnonzero(gallery_categories == category)
        try:
            index = build_index(gallery[rows], factory=factory, metric=metric, seed=seed)
            partitions[category] = factory
        except IndexBuildError:
            index = build_index(gallery[rows], factory="Flat", metric=metric, seed=seed)
            partitions[category] = "Flat"
        scores, ids = search(index, queries, min(k, len(rows)), metric=metric, params=params)
        similarity = -scores if metric == "l2" else scores
        similarity = similarity + bonus * (query_categories == category)[:, None]
        found = ids >= 0
        all_scores.append(np.where(found, similarity, -np.inf))
        all_ids.append(np.where(found, rows[np.clip(ids, 0, None)], -1))
    scores = np.concatenate(all_scores, axis=1) if all_scores else np.zeros((n_queries, 0))
    ids = np.concatenate(all_ids, axis=1) if all_ids else np.zeros((n_queries, 0), np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    return top_scores.astype(np.float32), np.where(np.isfinite(top_scores), top_ids, -1), partitions
