"""Category-aware search: a score bonus for gallery items of the query's (predicted) category.

The gallery sits in a vector store (:mod:`fashionrec.indexing.stores`: faiss or Milvus) with
each row's category as its label; each query searches every category (the store's
per-category search: an index of the same kind over that category, or exact search where
it is too small to train one) and the hits are merged after adding ``boost`` to its own
category's scores. With exact search this is exactly "similarity + boost x same category"
over the whole gallery; ``boost = inf`` ranks the query's category first (by similarity),
then the rest, so a query never gets fewer than k results.
"""
from __future__ import annotations

import math

import numpy as np

from .stores import PAD_ID, VectorStore

# Larger than any difference of two cosine (or inner product of unit vectors) scores.
HARD_BOOST = 4.0


def category_aware_search(store: VectorStore, queries: np.ndarray, query_categories, categories, k: int,
                          boost: float, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top ``k`` stored rows per query, ``boost`` added to the query's category's rows.

    ``store`` holds the gallery labelled with the categories to rank by (e.g. predicted ones),
    ``categories`` lists them. Scores are similarities plus the bonus; ids are the store's
    (``PAD_ID`` where an approximate index found fewer). Similarities only: ``l2`` is refused.
    """
    if metric == "l2":
        raise ValueError("category-aware ranking adds a bonus to similarities: use the cosine or ip metric")
    query_categories = np.asarray(query_categories).astype(str)
    bonus = HARD_BOOST if math.isinf(boost) else float(boost)
    all_scores, all_ids = [], []
    for category in categories:
        n = store.count(category)
        if n == 0:
            continue
        scores, ids = store.search(queries, min(k, n), category=category)
        found = ids != PAD_ID
        all_scores.append(np.where(found, scores + bonus * (query_categories == category)[:, None], -np.inf))
        all_ids.append(ids)
    scores = np.concatenate(all_scores, axis=1) if all_scores else np.zeros((len(queries), 0))
    ids = np.concatenate(all_ids, axis=1) if all_ids else np.zeros((len(queries), 0), np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    return top_scores.astype(np.float32), np.where(np.isfinite(top_scores), top_ids, PAD_ID)
