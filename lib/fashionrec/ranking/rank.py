"""The ranking both towers run: a store, the query vectors, k and the policies in, ranked rows out.

``evaluate`` ranks a whole query split in one call, the :class:`~fashionrec.serving.recommender.Recommender`
one shopper's photo; both call :func:`rank` with a :class:`Ranking` (the policies of
:mod:`fashionrec.ranking.policies`), so what the protocol measures is what the product serves.

With a :class:`~fashionrec.ranking.policies.CategoryBonus` each query searches twice, over the
allowed rows of its category and over the other allowed rows, and the two lists merge after
the bonus: with an exhaustive store that is exactly "similarity + boost x same category" over
every allowed row, and ``boost = inf`` puts the query's category first without ever returning
fewer than k results.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from ..indexing.faiss_index import resolve_factory
from ..indexing.milvus_store import temporary_collection_name
from ..settings import StoreSettings
from .milvus import MilvusRowStore, milvus_uri
from .policies import CategoryBonus, ColourFusion, allowed_mask
from .store import FaissRowStore

PAD_ROW = -1


@dataclass(frozen=True)
class Ranking:
    """The policies of one ranking: row filters (all must allow a row), a category bonus, a colour fusion.

    Another filter (attribute filters over the items table, say) is one more entry of ``filters``:
    any object with ``mask(n_rows)``, e.g. :class:`~fashionrec.ranking.policies.AllowedRows`.
    """

    filters: tuple = field(default_factory=tuple)
    bonus: CategoryBonus | None = None
    fusion: ColourFusion | None = None


def rank(store, queries: np.ndarray, k: int, ranking: Ranking = Ranking(), query_categories=None,
         query_colour: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (n_queries, k), best first; slots beyond the allowed rows hold row -1 and score NaN.

    ``query_categories``: each query's category for the bonus (the classifier's prediction; a
    query without one, None, is ranked without the bonus). ``query_colour``: each query's
    colour descriptor, for the fusion. Scores are the similarities (fused, with a fusion); the
    bonus only orders.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n_rows = store.ntotal
    allowed = allowed_mask(ranking.filters, n_rows)
    scores = np.full((len(queries), k), np.nan, dtype=np.float32)
    rows = np.full((len(queries), k), PAD_ROW, dtype=np.int64)
    bonus = ranking.bonus
    if bonus is not None and store.metric == "l2":
        raise ValueError("a category bonus adds to similarities: use the cosine or ip metric")
    if bonus is None or query_categories is None:
        groups = {None: np.arange(len(queries))}
    else:
        query_categories = np.asarray(query_categories, dtype=object)
        groups = {category: np.flatnonzero(query_categories == category)
                  for category in dict.fromkeys(query_categories.tolist())}
    for category, members in groups.items():
        colour = None if query_colour is None else np.asarray(query_colour)[members]
        if category is None:
            found = _ranked(store, queries[members], k, allowed, ranking.fusion, colour)
        else:
            same = np.asarray(bonus.row_categories) == category
            all_rows = np.ones(n_rows, dtype=bool) if allowed is None else allowed
            found = _merged(_ranked(store, queries[members], k, all_rows & same, ranking.fusion, colour),
                            _ranked(store, queries[members], k, all_rows & ~same, ranking.fusion, colour),
                            bonus.boost, k)
        scores[members, :found[0].shape[1]], rows[members, :found[1].shape[1]] = found
    return scores, rows


def _ranked(store, queries: np.ndarray, k: int, allowed: np.ndarray | None, fusion: ColourFusion | None,
            query_colour: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the allowed rows by network similarity, or by the fused score with ``fusion``."""
    n_allowed = store.ntotal if allowed is None else int(allowed.sum())
    if n_allowed == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    if allowed is not None and n_allowed == len(allowed):
        allowed = None
    if fusion is None:
        return _padded(*store.search(queries, min(k, n_allowed), allowed))
    n_searched = n_allowed if store.exhaustive else fusion.candidates(k, n_allowed)
    network, candidates = store.search(queries, n_searched, allowed)
    out_scores = np.full((len(queries), min(k, n_allowed)), np.nan, dtype=np.float32)
    out_rows = np.full(out_scores.shape, PAD_ROW, dtype=np.int64)
    for i in range(len(queries)):
        valid = candidates[i] >= 0
        proposed = candidates[i][valid]
        fused = fusion.fused(network[i][valid], proposed, query_colour[i])
        order = np.argsort(-fused, kind="stable")[:out_scores.shape[1]]
        out_scores[i, :len(order)], out_rows[i, :len(order)] = fused[order], proposed[order]
    return out_scores, out_rows


def _padded(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float32).copy()
    scores[rows < 0] = np.nan
    return scores, np.asarray(rows, dtype=np.int64)


def _merged(same: tuple[np.ndarray, np.ndarray], others: tuple[np.ndarray, np.ndarray], boost: float,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the top k of both lists after ``boost`` is added to ``same``'s scores (ties: ``same`` first)."""
    scores = np.concatenate([same[0], others[0]], axis=1)
    rows = np.concatenate([same[1], others[1]], axis=1)
    group = np.concatenate([np.zeros(same[1].shape, np.int64), np.ones(others[1].shape, np.int64)], axis=1)
    valid = rows >= 0
    if math.isinf(boost):   # the category's rows first, each list by similarity
        primary, value = np.where(valid, group, 2), np.where(valid, scores, -np.inf)
    else:
        primary, value = np.where(valid, 0, 2), np.where(valid, scores + boost * (group == 0), -np.inf)
    position = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((position, group, -value, primary), axis=1)[:, :min(k, scores.shape[1])]
    return _padded(np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1))


@contextlib.contextmanager
def gallery_store(settings: StoreSettings, vectors: np.ndarray, labels, index: str = "Flat", metric: str = "cosine",
                  search_params: str = "", seed: int = 0):
    """A throwaway store of ``vectors`` (row i = vector i) of the kind ``settings`` names, closed (dropped) after.

    FAISS: in this process (``index`` a factory string or template, resolved for the size).
    Milvus: a temporary collection where ``settings`` says, dropped when the block ends.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if settings.store == "faiss":
        factory = resolve_factory(index, *vectors.shape)
        store = FaissRowStore.build(vectors, factory, metric, seed=seed, search_params=search_params,
                                    fallback_vectors=lambda rows: vectors[np.asarray(rows, dtype=np.int64)])
        yield store
        return
    store = MilvusRowStore.build(temporary_collection_name(), vectors, [str(label) for label in labels], index,
                                 metric, search_params, milvus_uri(settings), settings.milvus_token)
    try:
        yield store
    finally:
        store.discard(always=True)
